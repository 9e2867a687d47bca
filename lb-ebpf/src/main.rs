//! Baton's XDP data plane.
//!
//! `baton_xdp` routes QUIC datagrams addressed to a configured VIP and port to a worker:
//!
//! * short header: exact-CID override → server ID decoded from the CID → Maglev hash fallback;
//! * long header, Initial / 0-RTT: the DCID is normally client-chosen, so Maglev hash of it. Once
//!   the client has heard from the server it switches the DCID to the server's CID for *all* its
//!   packets, including further Initials (an Initial ACK is usually coalesced in front of the
//!   Handshake packet), so a DCID of our configured length whose first octet says so and whose
//!   server ID is known is routed like a short header. A random client DCID matches that only by
//!   chance, and even then it is routed the same way every time, which is all a client DCID needs;
//! * long header, Handshake: server-chosen DCID → as a short header;
//! * unknown version: Maglev hash of the DCID (RFC 8999 invariants only);
//! * anything else (not UDP to a VIP port, not configured yet): XDP_PASS.
//!
//! IPv6 extension headers are walked (at most [`MAX_IPV6_EXT_HEADERS`], see `ipv6_find_udp`); a
//! fragment, a routing header with segments left or a misplaced hop-by-hop header in a datagram
//! to a VIP is dropped and counted as malformed, as IPv4 first fragments are; so are non-first
//! fragments and longer chains to a VIP's address (`BATON_VIP_ADDRS`: they carry no port).
//!
//! Forwarding is layer-2 direct server return: the destination MAC becomes the worker's, the
//! source MAC becomes the MAC the frame was sent to (our ingress interface's) so switches and
//! bridges never learn the client's MAC behind our port; XDP_REDIRECT through the `BATON_TX_PORTS`
//! devmap, or XDP_TX when the worker sits behind the receiving interface. A worker whose
//! `BATON_WORKER_ENCAP` slot says IPIP or GUE gets the datagram inside an outer IP (and UDP +
//! GUE) header addressed to it, sent to the same next-hop MAC (see `baton_encapsulate`), so it may
//! sit on another subnet; a datagram that would then exceed the path MTU is dropped and counted.
//! `baton_encapsulate` is a global BPF function (verified once, on its own) called with only the
//! context, the worker and the route: it finds the inner headers again rather than have the
//! routing carry parse results, which would multiply the verifier's states (see its comment).
//! The layer-2 path pays one inlined array lookup (`BATON_WORKER_ENCAP`) for all this.
//!
//! Fast path (`lb_common::fastpath`): while `BATON_FASTPATH`'s flags say so, the VIP check scans
//! the `BATON_VIP_TABLE` array, the server ID indexes the `BATON_SERVER_ID_TABLE` array, the
//! override hash lookup runs only when the packet's override bucket is non-empty, and the Maglev
//! modulo uses a validated reciprocal. Array lookups are inlined; every hash lookup avoided is a
//! helper call (~20 ns here). Without the flags the program uses the authoritative hash maps and
//! decides identically.
//!
//! `baton_xdp_reference` (parse to the DCID, drop) is the benchmark baseline;
//! `baton_xdp_forward_floor` (the reference plus the forwarding every routed packet needs) shows
//! what routing itself costs; `baton_xdp_pass` goes on veth peers so native-mode redirects into
//! them are delivered.
#![no_std]
#![no_main]

mod maps;

use aya_ebpf::{
    bindings::{bpf_devmap_val, xdp_action, xdp_md},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use lb_common::cid::decode_server_id_words;
use lb_common::encap::{
    ENCAP_GUE, ENCAP_IPIP, ENCAP_NONE, EncapEntry, IPPROTO_IPIP, IPPROTO_IPV6, IPV6_HDR_LEN,
    OUTER_TTL, be16_native, csum_add_word, csum_fold, flow_hash, gue_source_port,
    ipv4_header_words,
};
use lb_common::fastpath::{
    BPF_F_MMAPABLE, FP_OVERRIDE_COUNTS, FP_SERVER_ID_TABLE, FP_VIP_TABLE, FastPathState,
    SERVER_ID_TABLE_MAX_LEN, SERVER_ID_TABLE_SIZE, ServerIdSlot, VIP_SLOT_ENABLED, VIP_TABLE_SLOTS,
    VipTable, fastmod_u32, reciprocal_matches,
};
use lb_common::{
    AF_INET, AF_INET6, CidKey, CidLayout, LbConfig, MAGLEV_TABLE_SIZE, MAX_CID_LEN,
    MAX_CID_OVERRIDES, MAX_VIPS, MAX_WORKERS, QUIC_V1, QUIC_V2, STATS_SLOTS, ServerIdKey, Stat,
    TX_SAME_IFACE, VipKey, VipValue, WORKER_IN_USE, WorkerEntry, WorkerRef, cid_hash_words,
    cid_key_words, self_described_len,
};
use maps::{ARRAY, DEVMAP, HASH, PERCPU_ARRAY, PinnedMap};

const MMAPABLE: usize = BPF_F_MMAPABLE as usize;

const MAGLEV_ENTRIES: usize = MAGLEV_TABLE_SIZE as usize;

#[btf_map(name = "BATON_CONFIG")]
static CONFIG: PinnedMap<u32, LbConfig, ARRAY, 1> = PinnedMap::new();
#[btf_map(name = "BATON_VIPS")]
static VIPS: PinnedMap<VipKey, VipValue, HASH, { MAX_VIPS as usize }> = PinnedMap::new();
#[btf_map(name = "BATON_CID_OVERRIDE")]
static CID_OVERRIDE: PinnedMap<CidKey, WorkerRef, HASH, { MAX_CID_OVERRIDES as usize }> =
    PinnedMap::new();
#[btf_map(name = "BATON_SERVER_IDS")]
static SERVER_IDS: PinnedMap<ServerIdKey, WorkerRef, HASH, { MAX_WORKERS as usize }> =
    PinnedMap::new();
#[btf_map(name = "BATON_WORKERS")]
static WORKERS: PinnedMap<u32, WorkerEntry, ARRAY, { MAX_WORKERS as usize }> = PinnedMap::new();
#[btf_map(name = "BATON_MAGLEV")]
static MAGLEV: PinnedMap<u32, u32, ARRAY, MAGLEV_ENTRIES> = PinnedMap::new();
#[btf_map(name = "BATON_TX_PORTS")]
static TX_PORTS: PinnedMap<u32, bpf_devmap_val, DEVMAP, { MAX_WORKERS as usize }> =
    PinnedMap::new();
// Value: how many enabled VIP ports the address has (never 0).
#[btf_map(name = "BATON_VIP_ADDRS")]
static VIP_ADDRS: PinnedMap<VipKey, u32, HASH, { MAX_VIPS as usize }> = PinnedMap::new();
#[btf_map(name = "BATON_STATS")]
static STATS: PinnedMap<u32, u64, PERCPU_ARRAY, { STATS_SLOTS as usize }> = PinnedMap::new();
// Per worker slot (as BATON_WORKERS): how to encapsulate; a zeroed slot is layer 2.
#[btf_map(name = "BATON_WORKER_ENCAP")]
static WORKER_ENCAP: PinnedMap<u32, EncapEntry, ARRAY, { MAX_WORKERS as usize }> = PinnedMap::new();
// Derived fast-path maps (lb_common::fastpath): each used only while its flag is set.
#[btf_map(name = "BATON_FASTPATH")]
static FASTPATH: PinnedMap<u32, FastPathState, ARRAY, 1, MMAPABLE> = PinnedMap::new();
#[btf_map(name = "BATON_VIP_TABLE")]
static VIP_TABLE: PinnedMap<u32, VipTable, ARRAY, 1> = PinnedMap::new();
#[btf_map(name = "BATON_SERVER_ID_TABLE")]
static SERVER_ID_TABLE: PinnedMap<
    u32,
    ServerIdSlot,
    ARRAY,
    { SERVER_ID_TABLE_SIZE as usize },
    MMAPABLE,
> = PinnedMap::new();

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers walked before giving up on finding UDP (see `ipv6_find_udp`).
const MAX_IPV6_EXT_HEADERS: usize = 6;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;

/// `BATON_FASTPATH` as the program uses it: flags and layout from one 8-byte load (one
/// consistent snapshot, whatever userspace is rewriting), the rest read on use.
struct Fast {
    flags: u32,
    cid_len: u8,
    server_id_len: u8,
    state: *const FastPathState,
}

impl Fast {
    #[inline(always)]
    fn read(state: *mut FastPathState) -> Fast {
        // SAFETY: array value, valid for the program's run and 8-aligned; volatile keeps it one
        // load (flags in the low half, cid_len and server_id_len in bytes 4 and 5).
        let head = unsafe { core::ptr::read_volatile(state as *const u64) };
        Fast {
            flags: head as u32,
            cid_len: (head >> 32) as u8,
            server_id_len: (head >> 40) as u8,
            state,
        }
    }

    #[inline(always)]
    fn other_overrides(&self) -> u32 {
        // SAFETY: array value from `read`, valid for the program's run.
        unsafe { (*self.state).other_overrides }
    }

    #[inline(always)]
    fn maglev_reciprocal(&self) -> u64 {
        // SAFETY: as above.
        unsafe { (*self.state).maglev_reciprocal }
    }
}

/// What to do with a packet whose QUIC header we have read.
enum Route {
    /// Worker index (into `BATON_WORKERS`), its entry (in use) and the stat that says why.
    Worker(u32, *const WorkerEntry, Stat),
    /// Hash the DCID through Maglev.
    Hash,
    /// Malformed or not something a client sends: drop and count.
    Malformed,
}

#[xdp]
pub fn baton_xdp(ctx: XdpContext) -> u32 {
    route_packet(&ctx)
}

#[xdp]
pub fn baton_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark baseline: the same header walk up to the DCID (Ethernet, IPv4 with options or
/// IPv6 without extension headers, UDP, QUIC first octet and DCID bounds), no maps, then
/// XDP_DROP.
#[xdp]
pub fn baton_xdp_reference(ctx: XdpContext) -> u32 {
    reference_walk(&ctx)
}

#[inline(always)]
fn reference_walk(ctx: &XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_LEN > end {
        return xdp_action::XDP_PASS;
    }
    let udp = match read_u16(data + 12) {
        ETH_P_IP => {
            if data + ETH_LEN + 20 > end {
                return xdp_action::XDP_PASS;
            }
            let ihl = ((read_u8(data + ETH_LEN) & 0x0f) as usize) * 4;
            if ihl < 20 || read_u8(data + ETH_LEN + 9) != IPPROTO_UDP {
                return xdp_action::XDP_PASS;
            }
            data + ETH_LEN + ihl
        }
        ETH_P_IPV6 => {
            if data + ETH_LEN + IPV6_LEN > end || read_u8(data + ETH_LEN + 6) != IPPROTO_UDP {
                return xdp_action::XDP_PASS;
            }
            data + ETH_LEN + IPV6_LEN
        }
        _ => return xdp_action::XDP_PASS,
    };
    let quic = udp + UDP_LEN;
    if quic + 6 > end {
        return xdp_action::XDP_PASS;
    }
    let (dcid, len) = if read_u8(quic) & 0x80 == 0 {
        (quic + 1, 8)
    } else {
        (quic + 6, read_u8(quic + 5) as usize)
    };
    if len > MAX_CID_LEN || dcid + len > end {
        return xdp_action::XDP_PASS;
    }
    xdp_action::XDP_DROP
}

/// Benchmark floor: what every routed packet costs whatever the routing: the reference's header
/// walk, then the forwarding `baton_xdp` must do (worker 0's MAC into the frame, the per-verdict
/// counters: IP version, route kind, bytes, redirected; XDP_REDIRECT through the devmap). The
/// difference between this and `baton_xdp` is the cost of the routing decision alone.
#[xdp]
pub fn baton_xdp_forward_floor(ctx: XdpContext) -> u32 {
    if reference_walk(&ctx) != xdp_action::XDP_DROP {
        return xdp_action::XDP_PASS;
    }
    count(Stat::Ipv4);
    // Layer 2 only: the floor is the cheapest forward, and worker 0 is never encapsulated there.
    match worker_entry(0) {
        Some(entry) => forward_l2(&ctx, 0, entry, Stat::RoutedServerId),
        None => drop_count(Stat::NoWorker),
    }
}

#[inline(always)]
fn read_u8(addr: usize) -> u8 {
    // SAFETY: every caller has checked `addr + 1 <= data_end` (the verifier enforces it).
    unsafe { *(addr as *const u8) }
}

#[inline(always)]
fn read_u16(addr: usize) -> u16 {
    // SAFETY: as `read_u8`, for 2 bytes; unaligned is fine (see `load_u32`).
    u16::from_be(unsafe { *(addr as *const u16) })
}

/// Loads 4 or 8 packet bytes in one instruction. The address need not be aligned: x86's BPF
/// permits unaligned packet access, and a `read_unaligned` would make LLVM's BPF backend split
/// the load into single bytes. Callers have checked the bytes against the packet end.
#[inline(always)]
fn load_u32(addr: usize) -> u32 {
    // SAFETY: see above.
    unsafe { *(addr as *const u32) }
}

#[inline(always)]
fn load_u64(addr: usize) -> u64 {
    // SAFETY: see above.
    unsafe { *(addr as *const u64) }
}

/// Stack storage for a map key, zeroed with three word stores. Zeroing a key (even `[0u64; 3]`)
/// otherwise becomes a call to compiler-builtins' byte-at-a-time `memset`: ~150 instructions.
#[repr(C, align(8))]
struct KeyBuf([u64; 3]);

impl KeyBuf {
    /// Zeroes `mem` in place and returns it. In place matters: returning a zeroed value lets
    /// LLVM turn the move into the very `memset` call this type exists to avoid.
    #[inline(always)]
    fn zeroed_in(mem: &mut core::mem::MaybeUninit<Self>) -> &mut Self {
        let words = mem.as_mut_ptr() as *mut u64;
        // SAFETY: three in-bounds word stores initialise all of it. Volatile, or LLVM folds them
        // back into a `memset` call.
        unsafe {
            core::ptr::write_volatile(words, 0);
            core::ptr::write_volatile(words.add(1), 0);
            core::ptr::write_volatile(words.add(2), 0);
            mem.assume_init_mut()
        }
    }

    #[inline(always)]
    fn as_mut<T>(&mut self) -> &mut T {
        const { assert!(size_of::<T>() <= 24 && align_of::<T>() <= 8) };
        // SAFETY: 24 zeroed, 8-aligned bytes; the keys used here are plain integers and arrays.
        unsafe { &mut *(self as *mut Self as *mut T) }
    }
}

#[inline(always)]
fn count(stat: Stat) {
    add(stat, 1);
}

#[inline(always)]
fn add(stat: Stat, n: u64) {
    if let Some(slot) = STATS.lookup(&(stat as u32)) {
        // SAFETY: a per-CPU slot: only this CPU writes it while we run.
        unsafe { *slot += n };
    }
}

#[inline(always)]
fn pass() -> u32 {
    count(Stat::Passed);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn drop_count(stat: Stat) -> u32 {
    count(stat);
    xdp_action::XDP_DROP
}

#[inline(always)]
fn route_packet(ctx: &XdpContext) -> u32 {
    let cfg = match CONFIG.lookup(&0) {
        // SAFETY: array values are always valid; we copy the few bytes out.
        Some(cfg) => unsafe { *cfg },
        None => return pass(),
    };
    if cfg.ready == 0 {
        return pass();
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_LEN > end {
        return pass();
    }

    let fp = match FASTPATH.lookup(&0) {
        Some(state) => Fast::read(state),
        // Key 0 of a one-entry array always exists.
        None => return pass(),
    };

    // Find UDP and build the VIP key as the three words of a `VipKey` (address, address,
    // port | family << 16). Until the destination port is readable we cannot tell VIP traffic
    // from anything else, so truncation up to there passes.
    let udp = match read_u16(data + 12) {
        ETH_P_IP => {
            let ip = data + ETH_LEN;
            if ip + 20 > end {
                return pass();
            }
            let ver_ihl = read_u8(ip);
            let ihl = ((ver_ihl & 0x0f) as usize) * 4;
            if ver_ihl >> 4 != 4 || ihl < 20 || read_u8(ip + 9) != IPPROTO_UDP {
                return pass();
            }
            // Non-first fragments carry no UDP header: not identifiable, pass them on.
            let frag = read_u16(ip + 6);
            if frag & 0x1fff != 0 {
                return pass();
            }
            let udp = ip + ihl;
            if udp + 4 > end {
                return pass();
            }
            let port = read_u16(udp + 2) as u64;
            if !is_vip(
                &fp,
                [load_u32(ip + 16) as u64, 0, port | (AF_INET as u64) << 16],
            ) {
                return pass();
            }
            count(Stat::Ipv4);
            // QUIC sets DF; a first fragment (MF) to a VIP cannot be routed whole.
            if frag & 0x2000 != 0 {
                return drop_count(Stat::Malformed);
            }
            udp
        }
        ETH_P_IPV6 => {
            let ip = data + ETH_LEN;
            if ip + IPV6_LEN > end || read_u8(ip) >> 4 != 6 {
                return pass();
            }
            let (udp, unroutable) = match ipv6_find_udp(ip, end) {
                Ipv6Walk::Udp(udp, unroutable) => (udp, unroutable),
                Ipv6Walk::NotUdp => return pass(),
                // No port to match, but no client of a VIP address sends these: drop them if
                // the address is a VIP's (so they never reach this host's reassembly).
                Ipv6Walk::Hostile => {
                    if is_vip_address([
                        load_u64(ip + 24),
                        load_u64(ip + 32),
                        (AF_INET6 as u64) << 16,
                    ]) {
                        count(Stat::Ipv6);
                        return drop_count(Stat::Malformed);
                    }
                    return pass();
                }
            };
            if udp + 4 > end {
                return pass();
            }
            let port = read_u16(udp + 2) as u64;
            if !is_vip(
                &fp,
                [
                    load_u64(ip + 24),
                    load_u64(ip + 32),
                    port | (AF_INET6 as u64) << 16,
                ],
            ) {
                return pass();
            }
            count(Stat::Ipv6);
            if unroutable {
                return drop_count(Stat::Malformed);
            }
            udp
        }
        _ => return pass(),
    };

    // From here on the packet is ours: anything short or inconsistent is dropped and counted.
    // Every byte is read behind its own check against the packet end, and the logical length
    // checks (UDP length, QUIC header length) come only *after* the reads: LLVM uses an earlier
    // "udp + udp_len <= end" to delete later per-byte checks as redundant, and the verifier,
    // which cannot follow that reasoning, then rejects the program.
    let end = ctx.data_end();
    if udp + UDP_LEN + 1 > end {
        return drop_count(Stat::Malformed);
    }
    let udp_len = read_u16(udp + 4) as usize;
    let quic = udp + UDP_LEN;
    let first = read_u8(quic);

    let long = first & 0x80 != 0;
    // `base` is the byte before the DCID (first octet, or the long header's DCID length byte).
    let (version, base, len, header_len) = if !long {
        let cid_len = cfg.cid_len as usize;
        if cid_len == 0 || cid_len > MAX_CID_LEN {
            return drop_count(Stat::Malformed);
        }
        (0, quic, cid_len, 1 + cid_len)
    } else {
        if quic + 6 > end {
            return drop_count(Stat::Malformed);
        }
        let version = u32::from_be(load_u32(quic + 1));
        let dcid_len = read_u8(quic + 5) as usize;
        // v1/v2 cap CIDs at 20 bytes; other versions may use up to 255 and we hash the first 20.
        if (version == QUIC_V1 || version == QUIC_V2) && dcid_len > MAX_CID_LEN {
            return drop_count(Stat::Malformed);
        }
        let take = if dcid_len > MAX_CID_LEN {
            MAX_CID_LEN
        } else {
            dcid_len
        };
        (version, quic + 5, take, 6 + dcid_len)
    };
    let mut key_mem = core::mem::MaybeUninit::uninit();
    let (words, key_buf) = match load_cid(base, end, len, &mut key_mem) {
        Some(loaded) => loaded,
        None => return drop_count(Stat::Malformed),
    };
    // The UDP length is authoritative (Ethernet padding may follow): all of it must be here,
    // and it must hold the header we just read.
    if udp_len < UDP_LEN + header_len || udp + udp_len > ctx.data_end() {
        return drop_count(Stat::Malformed);
    }

    let key: &CidKey = key_buf.as_mut();
    let route = if !long {
        route_server_cid(&cfg, &fp, key, &words)
    } else if version != QUIC_V1 && version != QUIC_V2 {
        Route::Hash
    } else {
        // v2 (RFC 9369) renumbered the long-header types; map them onto v1's.
        let raw_type = (first >> 4) & 0x03;
        let pkt_type = if version == QUIC_V2 {
            (raw_type + 3) & 0x03
        } else {
            raw_type
        };
        match pkt_type {
            // Initial, 0-RTT: a server-issued CID (see the module docs) or a client's random one.
            0 | 1 => {
                let first_octet = (words[0] >> 8) as u8;
                if len == cfg.cid_len as usize && self_described_len(first_octet) == len {
                    route_server_cid(&cfg, &fp, key, &words)
                } else {
                    Route::Hash
                }
            }
            // Handshake.
            2 => route_server_cid(&cfg, &fp, key, &words),
            // Retry is only ever sent by servers.
            _ => Route::Malformed,
        }
    };

    let (worker, entry, why) = match route {
        Route::Worker(worker, entry, why) => (worker, entry, why),
        Route::Malformed => return drop_count(Stat::Malformed),
        Route::Hash => {
            let size = if cfg.maglev_size > MAGLEV_TABLE_SIZE {
                MAGLEV_TABLE_SIZE
            } else {
                cfg.maglev_size
            };
            if size == 0 {
                return drop_count(Stat::NoWorker);
            }
            let hash = cid_hash_words(&words);
            // `hash % size` without a 64-bit div when the controller left the reciprocal.
            let m = fp.maglev_reciprocal();
            let slot = if reciprocal_matches(m, size) {
                fastmod_u32(hash, m, size)
            } else {
                hash % size
            };
            let worker = match MAGLEV.lookup(&slot) {
                // SAFETY: array slot, always valid.
                Some(w) => unsafe { *w },
                None => return drop_count(Stat::NoWorker),
            };
            match worker_entry(worker) {
                Some(entry) => (worker, entry, Stat::RoutedHash),
                None => return drop_count(Stat::NoWorker),
            }
        }
    };
    forward(ctx, worker, entry, why)
}

/// What [`ipv6_find_udp`] found.
enum Ipv6Walk {
    /// The UDP header's address, and whether a datagram to a VIP behind this chain must be
    /// dropped rather than routed: a fragment (QUIC never lets IPv6 fragment; a worker would
    /// see one piece), a routing header with segments left (the VIP is a transit hop, not the
    /// destination), a hop-by-hop header not first (RFC 8200 forbids it).
    Udp(usize, bool),
    /// ESP, no next header, another protocol, or a chain cut short: passes as before.
    NotUdp,
    /// No port can be read, but no QUIC client sends this: a non-first fragment (what follows
    /// is mid-payload) or a chain longer than the limit (walking on would cost the verifier
    /// more states for nothing real traffic carries). Dropped if the address is a VIP's.
    Hostile,
}

/// Walks at most [`MAX_IPV6_EXT_HEADERS`] IPv6 extension headers from the fixed header at `ip`
/// (its 40 bytes checked by the caller) to a UDP header.
///
/// AH (its length in 4-byte units) is walked, so an AH-protected datagram to a VIP is balanced
/// and the worker's stack checks it. The limit is small because each header costs a bounded
/// loop iteration the verifier explores, and real QUIC traffic carries none or one (hop-by-hop).
#[inline(always)]
fn ipv6_find_udp(ip: usize, end: usize) -> Ipv6Walk {
    let mut next = read_u8(ip + 6);
    let mut hdr = ip + IPV6_LEN;
    let mut unroutable = false;
    let mut i = 0;
    while i < MAX_IPV6_EXT_HEADERS {
        if next == IPPROTO_UDP {
            return Ipv6Walk::Udp(hdr, unroutable);
        }
        // Every extension header we walk starts with next header and a length byte.
        if hdr + 8 > end {
            return Ipv6Walk::NotUdp;
        }
        let len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                if next == IPPROTO_HOPOPTS && i != 0 {
                    unroutable = true;
                }
                // Routing header byte 3: segments left.
                if next == IPPROTO_ROUTING && read_u8(hdr + 3) != 0 {
                    unroutable = true;
                }
                (read_u8(hdr + 1) as usize + 1) * 8
            }
            IPPROTO_FRAGMENT => {
                // Bytes 2-3: offset (13 bits, 8-byte units), 2 reserved bits, M.
                if read_u16(hdr + 2) & 0xfff8 != 0 {
                    return Ipv6Walk::Hostile;
                }
                // A first fragment, or an atomic one (RFC 6946: offset 0, no M), which no QUIC
                // stack sends (RFC 8021) and which we drop too, so a fragment header is never
                // routed.
                unroutable = true;
                8
            }
            IPPROTO_AH => (read_u8(hdr + 1) as usize + 2) * 4,
            _ => return Ipv6Walk::NotUdp,
        };
        next = read_u8(hdr);
        hdr += len;
        i += 1;
    }
    match next {
        IPPROTO_UDP => Ipv6Walk::Udp(hdr, unroutable),
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT | IPPROTO_AH => {
            Ipv6Walk::Hostile
        }
        _ => Ipv6Walk::NotUdp,
    }
}

/// Is `key` (a [`VipKey::address`] as three little-endian words) the address of an enabled
/// VIP? A hash lookup: only packets that carry no port get here.
#[inline(always)]
fn is_vip_address(key: [u64; 3]) -> bool {
    let mut mem = core::mem::MaybeUninit::uninit();
    let buf = KeyBuf::zeroed_in(&mut mem);
    buf.0 = key;
    let k: &mut VipKey = buf.as_mut();
    VIP_ADDRS.lookup(k).is_some()
}

/// Is `key` (a [`VipKey`] as three little-endian words) an enabled VIP? With the VIP table
/// flag set, a scan of `BATON_VIP_TABLE`'s used slots (array lookup, inlined: no helper call);
/// otherwise the `BATON_VIPS` hash lookup.
#[inline(always)]
fn is_vip(fp: &Fast, key: [u64; 3]) -> bool {
    if fp.flags & FP_VIP_TABLE != 0 {
        let table = match VIP_TABLE.lookup(&0) {
            Some(t) => t as *const u64,
            None => return false,
        };
        // A slot's last word is port | family << 16 | pad << 24 | flags << 32.
        let last = key[2] | (VIP_SLOT_ENABLED as u64) << 32;
        // SAFETY: array value of `size_of::<VipTable>()` bytes, 8-aligned; every index below
        // is < 1 + 3 * VIP_TABLE_SLOTS words.
        unsafe {
            let count = *(table as *const u32) as usize;
            let mut i = 0;
            while i < VIP_TABLE_SLOTS {
                if i >= count {
                    break;
                }
                let slot = table.add(1 + 3 * i);
                if *slot.add(2) == last && *slot == key[0] && *slot.add(1) == key[1] {
                    return true;
                }
                i += 1;
            }
        }
        return false;
    }
    let mut mem = core::mem::MaybeUninit::uninit();
    let buf = KeyBuf::zeroed_in(&mut mem);
    buf.0 = key;
    let vip: &mut VipKey = buf.as_mut();
    match VIPS.lookup(vip) {
        // SAFETY: hash value read right after lookup; flags bit 0 = enabled.
        Some(v) => (unsafe { (*v).flags } & 1) != 0,
        None => false,
    }
}

/// Fills the override-map key with the `len`-byte (≤ 20) DCID after `base` and returns it as
/// [`lb_common::cid_key_words`]. Fast path: when 24 bytes from `base` are in the packet (any
/// real QUIC packet), three word loads masked to the length. Otherwise byte by byte, each
/// checked against the end (`len` is not a constant, so the verifier wants a check per byte);
/// `None` if the DCID is cut short.
#[inline(always)]
fn load_cid(
    base: usize,
    end: usize,
    len: usize,
    mem: &mut core::mem::MaybeUninit<KeyBuf>,
) -> Option<([u64; 3], &mut KeyBuf)> {
    if base + 24 <= end {
        // Key byte j (j ≥ 1) is DCID byte j-1 and is kept if j ≤ len; byte 0 becomes the length.
        let keep = |w: u64, first_byte: usize| {
            let n = len + 1;
            if n >= first_byte + 8 {
                w
            } else if n <= first_byte {
                0
            } else {
                w & ((1u64 << (8 * (n - first_byte))) - 1)
            }
        };
        let w0 = (load_u64(base) & !0xff) | len as u64;
        let words = [
            keep(w0, 0),
            keep(load_u64(base + 8), 8),
            keep(load_u64(base + 16), 16),
        ];
        // SAFETY: three in-bounds word stores initialise all of it (no zeroing first).
        let key = unsafe {
            let p = mem.as_mut_ptr() as *mut u64;
            p.write(words[0]);
            p.add(1).write(words[1]);
            p.add(2).write(words[2]);
            mem.assume_init_mut()
        };
        return Some((words, key));
    }
    let key = KeyBuf::zeroed_in(mem);
    let k: &mut CidKey = key.as_mut();
    k.len = len as u8;
    let src = base + 1;
    let mut i = 0;
    while i < MAX_CID_LEN {
        if i < len {
            if src + i + 1 > end {
                return None;
            }
            k.bytes[i] = read_u8(src + i);
        }
        i += 1;
    }
    let words = cid_key_words(k);
    Some((words, key))
}

/// Override map, then the server ID in the CID, then Maglev.
///
/// Fast path (`lb_common::fastpath`), when `BATON_FASTPATH` was built for this layout: the
/// server ID indexes `BATON_SERVER_ID_TABLE` (server IDs of at most 2 bytes), whose slot says
/// both the worker and whether any override has a CID with this server ID; the override hash
/// lookup runs only if that count (or, for CIDs without such a server ID, `other_overrides`) is
/// non-zero. Otherwise the hash maps, as the controller writes them.
#[inline(always)]
fn route_server_cid(cfg: &LbConfig, fp: &Fast, key: &CidKey, words: &[u64; 3]) -> Route {
    let same_layout = fp.cid_len == cfg.cid_len && fp.server_id_len == cfg.server_id_len;
    let table_layout = same_layout && cfg.server_id_len <= SERVER_ID_TABLE_MAX_LEN;
    let sid = if table_layout && fp.flags & FP_SERVER_ID_TABLE != 0 {
        // Userspace set the flag only for a valid layout with a 1- or 2-byte server ID, and
        // `same_layout` says it is the live one: no need to validate the layout per packet.
        decode_server_id_words(cfg.server_id_len as usize, words)
    } else {
        match CidLayout::new(cfg.cid_len, cfg.server_id_len) {
            Ok(layout) => layout.decode_server_id_words(words),
            Err(_) => None,
        }
    };
    let slot = match sid {
        Some(sid) if table_layout => SERVER_ID_TABLE.lookup(&(sid as u32)),
        _ => None,
    };
    let may_have_override = if !same_layout || fp.flags & FP_OVERRIDE_COUNTS == 0 {
        true
    } else if table_layout && sid.is_some() {
        match slot {
            // SAFETY: array slot, always valid.
            Some(s) => (unsafe { (*s).overrides }) != 0,
            None => true,
        }
    } else {
        fp.other_overrides() != 0
    };
    if may_have_override {
        if let Some(w) = CID_OVERRIDE.lookup(key) {
            // SAFETY: hash value read right after lookup.
            let worker = unsafe { (*w).worker };
            if let Some(entry) = worker_entry(worker) {
                return Route::Worker(worker, entry, Stat::RoutedOverride);
            }
        }
    }
    let server_id = match sid {
        Some(sid) => sid,
        None => return Route::Hash,
    };
    if table_layout && fp.flags & FP_SERVER_ID_TABLE != 0 {
        if let Some(s) = slot {
            // SAFETY: array slot, always valid.
            let worker = unsafe { (*s).worker };
            if let Some(entry) = worker_entry(worker) {
                return Route::Worker(worker, entry, Stat::RoutedServerId);
            }
        }
        return Route::Hash;
    }
    if let Some(w) = SERVER_IDS.lookup(&ServerIdKey { server_id }) {
        // SAFETY: hash value read right after lookup.
        let worker = unsafe { (*w).worker };
        if let Some(entry) = worker_entry(worker) {
            return Route::Worker(worker, entry, Stat::RoutedServerId);
        }
    }
    Route::Hash
}

/// The entry of worker `worker` if its slot is in use (`NO_WORKER` and out-of-range indices
/// have none).
#[inline(always)]
fn worker_entry(worker: u32) -> Option<*const WorkerEntry> {
    match WORKERS.lookup(&worker) {
        // SAFETY: array slot, always valid.
        Some(w) if (unsafe { (*w).flags } & WORKER_IN_USE) != 0 => Some(w as *const WorkerEntry),
        _ => None,
    }
}

/// Forwards per the worker's `BATON_WORKER_ENCAP` entry: layer 2 for mode 0 (or when the map
/// slot is missing), otherwise [`baton_encapsulate`].
#[inline(always)]
fn forward(ctx: &XdpContext, worker: u32, entry: *const WorkerEntry, why: Stat) -> u32 {
    let encap = match WORKER_ENCAP.lookup(&worker) {
        Some(e) => e as *const EncapEntry,
        None => return forward_l2(ctx, worker, entry, why),
    };
    // SAFETY: array value, valid for the program's run.
    if unsafe { (*encap).mode } == ENCAP_NONE {
        return forward_l2(ctx, worker, entry, why);
    }
    // Only the worker and the route: nothing of the parse is carried past the routing (see
    // `baton_encapsulate`).
    baton_encapsulate(ctx.ctx, worker, why as u32)
}

/// Writes the Ethernet header: destination = the worker's (next hop's) MAC, source = the MAC the
/// frame was sent to (ours) unless that was a group address, and (encapsulation) the ethertype.
/// `orig` is the frame's original destination MAC (4 + 2 bytes) as loaded.
#[inline(always)]
fn write_eth(data: usize, entry: *const WorkerEntry, orig: (u32, u16)) {
    // SAFETY: the caller checked 14 bytes from `data`; `entry` is an in-use array value;
    // unaligned 4- and 2-byte packet accesses are fine (see `load_u32`).
    unsafe {
        let eth = data as *mut u8;
        if orig.0 as u8 & 1 == 0 {
            *(eth.add(6) as *mut u32) = orig.0;
            *(eth.add(10) as *mut u16) = orig.1;
        }
        *(eth as *mut u32) = *(entry as *const u32);
        *(eth.add(4) as *mut u16) = *((entry as *const u8).add(4) as *const u16);
    }
}

#[inline(always)]
fn forward_l2(ctx: &XdpContext, worker: u32, entry: *const WorkerEntry, why: Stat) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_LEN > end {
        return drop_count(Stat::Malformed);
    }
    // SAFETY: 14 bytes checked above.
    let orig = unsafe { (*(data as *const u32), *((data + 4) as *const u16)) };
    write_eth(data, entry, orig);
    send(ctx, worker, entry, why, end - data)
}

/// Counts the route and the bytes, then XDP_TX or XDP_REDIRECT to the worker's port.
#[inline(always)]
fn send(ctx: &XdpContext, worker: u32, entry: *const WorkerEntry, why: Stat, len: usize) -> u32 {
    // SAFETY: an in-use `BATON_WORKERS` slot (see `worker_entry`); array values stay valid.
    let tx_port = unsafe { (*entry).tx_port };
    count(why);
    add(Stat::Bytes, len as u64);
    if tx_port == TX_SAME_IFACE {
        count(Stat::Tx);
        return xdp_action::XDP_TX;
    }
    match TX_PORTS.redirect(tx_port, xdp_action::XDP_DROP as u64) {
        Ok(action) => {
            count(Stat::Redirected);
            action
        }
        Err(_) => {
            // Only a controller/config fault gets here (worker names an empty devmap slot), so
            // it is worth a log line; the counter says how often.
            warn!(
                ctx,
                "worker {} names tx port {} but BATON_TX_PORTS has no device there: dropped",
                worker,
                tx_port
            );
            drop_count(Stat::RedirectError)
        }
    }
}

/// Puts an outer IP header (IPIP) or outer IP + UDP + GUE header (GUE) between the Ethernet
/// header and the inner datagram, which stays byte for byte as received (Ethernet padding after
/// it is trimmed first, so the outer lengths describe the frame). Outer and inner family may
/// differ: the protocol number (4 or 41) names the inner one.
///
/// Outer IPv4: no options, ID 0, DF, TTL 64, checksum over the 20 bytes; GUE over IPv4 sends
/// UDP checksum 0 (RFC 768 allows it and the inner datagram carries its own). Outer IPv6: hop
/// limit 64, flow label from the flow hash (RFC 6438); GUE over IPv6 carries a full UDP checksum
/// computed without reading the payload: an inner datagram whose UDP checksum is right sums to
/// a value known from its headers alone (Linux's local checksum offload rests on the same
/// identity). Where that does not apply (an inner IPv6 datagram with extension headers, or
/// inner IPv4 UDP with checksum 0) the outer checksum is 0, as RFC 6935/6936 allow for tunnels.
///
/// A global BPF function (exported, not inlined; its BTF linkage is global), which the verifier
/// checks once on its own with unknown arguments: inlined, or as a static subprogram, it would be
/// verified once per path through the parse and the route. Its arguments are the context, the
/// worker and the route only, so the caller keeps nothing of the parse alive across the routing:
/// anything it did keep (the inner family, the UDP header's offset) differs per parse path, and
/// the verifier, which then cannot prune the routing's states against each other, walks the
/// routing once per parse path, past its instruction limit (1M instead of ~100k). So the inner
/// headers are found again here (a few loads, and the extension-header walk for IPv6), and every
/// entry re-read and re-checked.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn baton_encapsulate(raw_ctx: *mut xdp_md, worker: u32, why: u32) -> u32 {
    let ctx = &XdpContext::new(raw_ctx);
    // The verifier knows nothing of the arguments: `why` is one of the route stats or nothing.
    let why = match why {
        w if w == Stat::RoutedOverride as u32 => Stat::RoutedOverride,
        w if w == Stat::RoutedServerId as u32 => Stat::RoutedServerId,
        w if w == Stat::RoutedHash as u32 => Stat::RoutedHash,
        _ => return drop_count(Stat::NoWorker),
    };
    let Some(entry) = worker_entry(worker) else {
        return drop_count(Stat::NoWorker);
    };
    let encap = match WORKER_ENCAP.lookup(&worker) {
        Some(e) => e as *const EncapEntry,
        None => return drop_count(Stat::NoWorker),
    };
    // SAFETY: array value, valid for the program's run; copied out field by field.
    let (mode, family, mtu, gue_port, sport_base, e) = unsafe {
        (
            (*encap).mode,
            (*encap).family,
            (*encap).mtu,
            (*encap).gue_port,
            (*encap).gue_sport_base,
            &*encap,
        )
    };
    // Writers validate entries (`EncapEntry::validate`); anything else is not a usable worker.
    if (mode != ENCAP_IPIP && mode != ENCAP_GUE) || (family != AF_INET && family != AF_INET6) {
        return drop_count(Stat::NoWorker);
    }
    let outer_v6 = family == AF_INET6;
    let gue = mode == ENCAP_GUE;

    let (data, end) = (ctx.data(), ctx.data_end());
    let ip = data + ETH_LEN;
    // The inner headers again, as `route_packet` found them (it routed only what passes these).
    if ip + 20 > end {
        return drop_count(Stat::Malformed);
    }
    let v6 = match read_u16(data + 12) {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return drop_count(Stat::Malformed),
    };
    let udp = if v6 {
        if ip + IPV6_LEN > end {
            return drop_count(Stat::Malformed);
        }
        match ipv6_find_udp(ip, end) {
            Ipv6Walk::Udp(udp, false) => udp,
            _ => return drop_count(Stat::Malformed),
        }
    } else {
        ip + ((read_u8(ip) & 0x0f) as usize) * 4
    };
    if udp + UDP_LEN > end {
        return drop_count(Stat::Malformed);
    }
    let udp_len = read_u16(udp + 4) as usize;
    let udp_csum = read_u16_raw(udp + 6);
    // Per family, each read behind its own check: the verifier does not carry "not IPv6" from
    // one branch on the ethertype to another. `inner_sum` is the sum of the inner datagram's
    // bytes (for GUE over IPv6), `None` where it cannot be known from the headers: with a right
    // UDP checksum, UDP segment + pseudo-header sums to 0, so the datagram sums to its IP header
    // minus that pseudo-header. For IPv6 the addresses cancel and 8 header bytes remain (only
    // with no extension headers); an IPv4 header sums to 0 by its own checksum.
    let (inner_len, client, inner_sum) = if v6 {
        if ip + IPV6_LEN > end {
            return drop_count(Stat::Malformed);
        }
        let sum = if read_u8(ip + 6) == IPPROTO_UDP && udp_csum != 0 {
            let s = csum_add_word(csum_add_word(0, load_u32(ip)), load_u32(ip + 4));
            Some(s + !be16_native(udp_len as u16) as u64 + !be16_native(IPPROTO_UDP as u16) as u64)
        } else {
            None
        };
        (
            IPV6_LEN + read_u16(ip + 4) as usize,
            [load_u64(ip + 8), load_u64(ip + 16)],
            sum,
        )
    } else {
        if ip + 20 > end {
            return drop_count(Stat::Malformed);
        }
        let (src, dst) = (load_u32(ip + 12), load_u32(ip + 16));
        let sum = if udp_csum != 0 {
            let p = csum_add_word(csum_add_word(0, src), dst)
                + be16_native(udp_len as u16) as u64
                + be16_native(IPPROTO_UDP as u16) as u64;
            Some(!csum_fold(p) as u64)
        } else {
            None
        };
        (read_u16(ip + 2) as usize, [src as u64, 0], sum)
    };
    let ip_hdr_len = udp - ip;
    // The inner datagram is exactly its headers and the UDP datagram (true of any QUIC packet):
    // the outer lengths and the GUE/IPv6 checksum rely on it.
    if inner_len != ip_hdr_len + udp_len || ip + inner_len > end {
        return drop_count(Stat::Malformed);
    }
    let overhead = e.overhead() as usize;
    // Not forwarded silently and not fragmented: a QUIC client's path MTU probes are padded
    // datagrams, and dropping an oversized one is how it learns the path is narrower.
    if overhead + inner_len > mtu as usize {
        return drop_count(Stat::EncapTooBig);
    }

    // Everything read from the inner datagram is read by now: growing the frame moves it.
    let orig_mac = (load_u32(data), read_u16_raw(data + 4));
    let hash = flow_hash(client, load_u32(udp));
    let inner_proto = if v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP };
    let inner_sum = if gue && outer_v6 { inner_sum } else { None };

    let trailing = (end - ip) - inner_len;
    if trailing > 0 {
        // SAFETY: `ctx.ctx` is this run's xdp_md; shrinking by bytes past the datagram.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(trailing as i32)) } != 0 {
            return drop_count(Stat::RedirectError);
        }
    }
    // SAFETY: as above; grows the headroom side, which XDP guarantees 256 bytes of.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return drop_count(Stat::RedirectError);
    }

    let (data, end) = (ctx.data(), ctx.data_end());
    let outer = data + ETH_LEN;
    let outer_len = (overhead + inner_len) as u16;
    let l4_proto = if gue { IPPROTO_UDP } else { inner_proto };
    // The UDP header's position, fixed per family so every store below has a constant offset.
    let udp_out = if outer_v6 {
        if outer + IPV6_LEN + UDP_LEN + 4 > end {
            return drop_count(Stat::Malformed);
        }
        // SAFETY: 40 bytes checked above (and the 12 after them); the entry's addresses are
        // 16 bytes each in an array value.
        unsafe {
            let o = outer as *mut u32;
            // Version 6, traffic class 0, the 20-bit flow label.
            *o = (0x6000_0000 | (hash & 0x000f_ffff)).to_be();
            *o.add(1) = u32::from_ne_bytes([
                ((outer_len - IPV6_HDR_LEN) >> 8) as u8,
                (outer_len - IPV6_HDR_LEN) as u8,
                l4_proto,
                OUTER_TTL,
            ]);
            let src = e.src.as_ptr() as *const u32;
            let dst = e.dst.as_ptr() as *const u32;
            let mut i = 0;
            while i < 4 {
                *o.add(2 + i) = *src.add(i);
                *o.add(6 + i) = *dst.add(i);
                i += 1;
            }
        }
        outer + IPV6_LEN
    } else {
        if outer + 20 + UDP_LEN + 4 > end {
            return drop_count(Stat::Malformed);
        }
        // SAFETY: as above, for 20 bytes; IPv4 addresses are the entry's first 4 bytes.
        unsafe {
            let src = *(e.src.as_ptr() as *const u32);
            let dst = *(e.dst.as_ptr() as *const u32);
            let h = ipv4_header_words(outer_len, l4_proto, src, dst);
            let o = outer as *mut u32;
            *o = h[0];
            *o.add(1) = h[1];
            *o.add(2) = h[2];
            *o.add(3) = h[3];
            *o.add(4) = h[4];
        }
        outer + 20
    };
    if gue {
        let len = outer_len - (udp_out - outer) as u16;
        let sport = gue_source_port(sport_base, hash);
        let w0 = be16_native(sport) as u32 | (be16_native(gue_port) as u32) << 16;
        // GUE variant 0, C = 0, no optional fields: only the proto/ctype byte is set.
        let gue_word = u32::from_ne_bytes([0, inner_proto, 0, 0]);
        let csum = match inner_sum {
            Some(inner_sum) => {
                let mut s = inner_sum;
                // The pseudo-header's addresses, from the entry (what was just written).
                // SAFETY: two 16-byte arrays in an array value.
                let (src, dst) = (e.src.as_ptr() as *const u32, e.dst.as_ptr() as *const u32);
                let mut i = 0;
                while i < 4 {
                    s = csum_add_word(s, unsafe { *src.add(i) });
                    s = csum_add_word(s, unsafe { *dst.add(i) });
                    i += 1;
                }
                // Pseudo-header length and next header, then the UDP header (length again).
                s += 2 * be16_native(len) as u64 + be16_native(IPPROTO_UDP as u16) as u64;
                s = csum_add_word(s, w0);
                s = csum_add_word(s, gue_word);
                match !csum_fold(s) {
                    0 => 0xffff,
                    c => c,
                }
            }
            None => 0,
        };
        // SAFETY: 12 bytes after the outer IP header checked above.
        unsafe {
            let u = udp_out as *mut u32;
            *u = w0;
            *u.add(1) = be16_native(len) as u32 | (csum as u32) << 16;
            *u.add(2) = gue_word;
        }
    }
    write_eth(data, entry, orig_mac);
    // SAFETY: 14 bytes checked above (with the outer header).
    unsafe {
        *((data + 12) as *mut u16) = be16_native(if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP });
    }
    count(Stat::Encapsulated);
    send(ctx, worker, entry, why, end - data)
}

/// Two packet bytes as a native load (no byte swap), for checksum sums and copies.
#[inline(always)]
fn read_u16_raw(addr: usize) -> u16 {
    // SAFETY: as `read_u8`, for 2 bytes.
    unsafe { *(addr as *const u16) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// No GPL-only helpers are used; the string matches the project's licence.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
