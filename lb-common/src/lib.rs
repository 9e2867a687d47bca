//! Types shared by Baton's XDP program (`lb-ebpf`) and userspace (`lb-user`, `worker`).
//!
//! Everything here is `no_std` and `#[repr(C)]` so the same definitions describe the BPF maps on
//! both sides. The BTF the XDP object carries names these structs, which is what makes
//! `bpftool map dump pinned /sys/fs/bpf/baton/<map>` print readable keys and values.
#![no_std]
#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod cid;
pub mod demo;
pub mod encap;
pub mod fastpath;
#[cfg(any(test, feature = "std"))]
mod text;

#[cfg(feature = "std")]
pub use text::{hex, percentile, unhex};

pub use cid::{
    CR_UNROUTABLE, CidLayout, LayoutError, MAX_CID_LEN, MAX_SERVER_ID_LEN, MIN_NONCE_LEN,
    config_rotation, self_described_len,
};

/// Directory under bpffs where the controller pins maps and the XDP link.
pub const PIN_DIR: &str = "/sys/fs/bpf/baton";

/// Names of the maps in the XDP object; the controller pins each one under [`PIN_DIR`] with this name.
pub mod map_names {
    pub const CONFIG: &str = "BATON_CONFIG";
    pub const VIPS: &str = "BATON_VIPS";
    pub const CID_OVERRIDE: &str = "BATON_CID_OVERRIDE";
    pub const SERVER_IDS: &str = "BATON_SERVER_IDS";
    pub const WORKERS: &str = "BATON_WORKERS";
    pub const MAGLEV: &str = "BATON_MAGLEV";
    pub const TX_PORTS: &str = "BATON_TX_PORTS";
    pub const STATS: &str = "BATON_STATS";
    /// The addresses of the enabled VIPs (keys: [`crate::VipKey::address`]), for packets to a
    /// VIP that carry no readable port; filled from `BATON_VIPS` by the controller.
    pub const VIP_ADDRS: &str = "BATON_VIP_ADDRS";
    /// Derived fast-path maps (see [`crate::fastpath`]): filled from the maps above by
    /// `lb_user::fastpath`, never authoritative on their own.
    pub const FASTPATH: &str = "BATON_FASTPATH";
    pub const VIP_TABLE: &str = "BATON_VIP_TABLE";
    pub const SERVER_ID_TABLE: &str = "BATON_SERVER_ID_TABLE";
    /// Per worker slot, how forwarded datagrams are encapsulated ([`crate::encap::EncapEntry`]).
    /// Added after the others: pin directories of older builds lack it (layer 2 only).
    pub const WORKER_ENCAP: &str = "BATON_WORKER_ENCAP";
}

/// Size of the Maglev lookup table: a prime, as Maglev requires, large enough that moving one of
/// up to a few hundred workers disturbs only its own share of entries.
pub const MAGLEV_TABLE_SIZE: u32 = 65537;
/// Upper bound on workers the data plane can address (index into `BATON_WORKERS`).
pub const MAX_WORKERS: u32 = 256;
/// Upper bound on (VIP, port) pairs.
pub const MAX_VIPS: u32 = 64;
/// Upper bound on exact-CID overrides (migrated connections, each with a few CIDs).
pub const MAX_CID_OVERRIDES: u32 = 262_144;
/// Sentinel worker index meaning "no worker".
pub const NO_WORKER: u32 = u32::MAX;

/// Global data-plane configuration, the single entry of the `BATON_CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// Length of the connection IDs our workers issue (the DCID length of short-header packets).
    pub cid_len: u8,
    /// Length of the server ID inside the CID (bytes after the first octet).
    pub server_id_len: u8,
    /// Non-zero once the controller has filled the maps; until then every packet passes.
    pub ready: u8,
    pub _pad: u8,
    /// Number of usable entries in the Maglev table (0 = no healthy worker: drop and count).
    pub maglev_size: u32,
}

/// Key of `BATON_VIPS`: an address (IPv4 mapped into the first 4 bytes, rest zero) and UDP port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// IPv4 in `addr[..4]` with the rest zero, or the IPv6 address; network byte order.
    pub addr: [u8; 16],
    /// UDP port in host byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    pub _pad: u8,
}

impl VipKey {
    /// The key of this VIP's address in `BATON_VIP_ADDRS`: the same key with port 0.
    pub const fn address(&self) -> VipKey {
        VipKey {
            addr: self.addr,
            port: 0,
            family: self.family,
            _pad: 0,
        }
    }
}

pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;

/// Value of `BATON_VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipValue {
    /// Reserved for per-VIP flags; 1 = enabled. The XDP program passes traffic to an entry
    /// without bit 0 set as if the VIP were not configured.
    pub flags: u32,
}

/// Key of `BATON_CID_OVERRIDE`: an exact connection ID, zero padded to [`MAX_CID_LEN`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidKey {
    pub len: u8,
    pub bytes: [u8; MAX_CID_LEN],
    pub _pad: [u8; 3],
}

impl CidKey {
    /// Builds a key from a CID; `None` if it is longer than [`MAX_CID_LEN`].
    pub fn new(cid: &[u8]) -> Option<Self> {
        if cid.len() > MAX_CID_LEN {
            return None;
        }
        let mut bytes = [0u8; MAX_CID_LEN];
        bytes[..cid.len()].copy_from_slice(cid);
        Some(Self {
            len: cid.len() as u8,
            bytes,
            _pad: [0; 3],
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..(self.len as usize).min(MAX_CID_LEN)]
    }
}

/// A [`CidKey`]'s 24 bytes as three little-endian u64 words: `[len, cid[0..7]]`,
/// `[cid[7..15]]`, `[cid[15..20], pad]`. The XDP program builds these straight from the packet
/// with three loads and masks, and hashes and decodes from them; this is the host-side view.
#[inline(always)]
pub fn cid_key_words(key: &CidKey) -> [u64; 3] {
    let mut raw = [0u8; 24];
    raw[0] = key.len;
    raw[1..21].copy_from_slice(&key.bytes);
    raw[21..24].copy_from_slice(&key._pad);
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&raw[8 * i..8 * i + 8]);
        u64::from_le_bytes(w)
    };
    [word(0), word(1), word(2)]
}

/// Hash of a connection ID for the Maglev lookup: the XDP program picks
/// `BATON_MAGLEV[cid_hash(key) % LbConfig::maglev_size]`, and `baton route` (which runs the
/// program) uses the same function to name the slot in its explanation. Covers the length and the
/// zero-padded bytes, so it is a hash of the CID alone.
#[inline(always)]
pub fn cid_hash(key: &CidKey) -> u32 {
    cid_hash_words(&cid_key_words(key))
}

/// [`cid_hash`] over [`cid_key_words`]. Three independent multiplies and a finaliser: a serial
/// byte-at-a-time hash (FNV) would cost as much as the rest of the XDP program.
#[inline(always)]
pub fn cid_hash_words(w: &[u64; 3]) -> u32 {
    let mut h = w[0].wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ w[1].rotate_left(23).wrapping_mul(0xd6e8_feb8_6659_fd93)
        ^ w[2].rotate_left(41).wrapping_mul(0xa076_1d64_78bd_642f);
    // Avalanche so every input bit reaches the low bits the modulo keeps.
    h ^= h >> 32;
    h = h.wrapping_mul(0xe703_7ed1_a0b4_28db);
    h ^= h >> 29;
    h as u32
}

/// QUIC version 1 (RFC 9000).
pub const QUIC_V1: u32 = 0x0000_0001;
/// QUIC version 2 (RFC 9369): same invariants, different long-header type numbers.
pub const QUIC_V2: u32 = 0x6b33_43cf;

/// Value of `BATON_CID_OVERRIDE` and `BATON_SERVER_IDS`: which worker gets the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerRef {
    /// Index into `BATON_WORKERS`.
    pub worker: u32,
}

/// Key of `BATON_SERVER_IDS`: the server ID bytes read big-endian into a u64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServerIdKey {
    pub server_id: u64,
}

/// Entry of the `BATON_WORKERS` array (index = worker index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerEntry {
    /// Destination MAC to write into the frame (layer-2 direct server return).
    pub mac: [u8; 6],
    /// Bit 0: the slot is in use. Bit 1: healthy.
    pub flags: u16,
    /// Index into the `BATON_TX_PORTS` devmap for XDP_REDIRECT; [`TX_SAME_IFACE`] means XDP_TX.
    pub tx_port: u32,
    pub _pad: u32,
    /// The worker's server ID (for `baton route` and debugging).
    pub server_id: u64,
}

pub const WORKER_IN_USE: u16 = 1;
pub const WORKER_HEALTHY: u16 = 2;
/// `WorkerEntry::tx_port` value meaning "the worker is behind the receiving interface: XDP_TX".
pub const TX_SAME_IFACE: u32 = u32::MAX;

/// Per-CPU counters in `BATON_STATS`, one slot per verdict. The controller sums across CPUs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Not UDP to a configured VIP/port (or not yet configured): XDP_PASS.
    Passed = 0,
    /// UDP to a VIP with a truncated or malformed QUIC header: XDP_DROP. Also counts what no
    /// client sends to a VIP: IPv4 first fragments (QUIC sets DF), IPv6 datagrams with a
    /// fragment header, a routing header with segments left or a hop-by-hop header not first,
    /// and Retry packets; and, to a VIP's address whatever the port (`BATON_VIP_ADDRS`), IPv6
    /// non-first fragments and chains of more extension headers than the program walks.
    Malformed = 1,
    /// Routed by an exact-CID override.
    RoutedOverride = 2,
    /// Routed by the server ID encoded in the CID.
    RoutedServerId = 3,
    /// Routed by Maglev hashing (Initial/0-RTT, unknown server ID, unroutable CID, unknown version).
    RoutedHash = 4,
    /// The chosen worker had no usable entry, or no healthy worker exists: XDP_DROP.
    NoWorker = 5,
    /// `bpf_redirect_map` failed, or (encapsulation) the frame could not be grown or trimmed.
    RedirectError = 6,
    /// Forwarded with XDP_TX.
    Tx = 7,
    /// Forwarded with XDP_REDIRECT.
    Redirected = 8,
    /// IPv4 packets seen to a VIP.
    Ipv4 = 9,
    /// IPv6 packets seen to a VIP.
    Ipv6 = 10,
    /// Bytes forwarded to workers (frames as sent: encapsulated ones with their outer headers).
    Bytes = 11,
    /// Forwarded with an outer header (`BATON_WORKER_ENCAP`: IPIP or GUE); also counted under the
    /// route and `tx`/`redirected` as layer-2 forwards are.
    Encapsulated = 12,
    /// Would have exceeded the worker's path MTU once encapsulated: XDP_DROP (not counted as
    /// routed). A QUIC client's path MTU probes are padded datagrams; losing one is how it learns.
    EncapTooBig = 13,
}

pub const STAT_COUNT: u32 = 14;
/// Slots in `BATON_STATS`: more than [`STAT_COUNT`], so that verdicts added later fit in a map
/// pinned by an older build (a different size would force the map to be recreated).
pub const STATS_SLOTS: u32 = 32;
const _: () = assert!(STAT_COUNT <= STATS_SLOTS);

impl Stat {
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::Passed,
        Stat::Malformed,
        Stat::RoutedOverride,
        Stat::RoutedServerId,
        Stat::RoutedHash,
        Stat::NoWorker,
        Stat::RedirectError,
        Stat::Tx,
        Stat::Redirected,
        Stat::Ipv4,
        Stat::Ipv6,
        Stat::Bytes,
        Stat::Encapsulated,
        Stat::EncapTooBig,
    ];

    /// Stable snake_case name used by the CLI, JSON output and Prometheus.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Passed => "passed",
            Stat::Malformed => "malformed",
            Stat::RoutedOverride => "routed_override",
            Stat::RoutedServerId => "routed_server_id",
            Stat::RoutedHash => "routed_hash",
            Stat::NoWorker => "no_worker",
            Stat::RedirectError => "redirect_error",
            Stat::Tx => "tx",
            Stat::Redirected => "redirected",
            Stat::Ipv4 => "ipv4",
            Stat::Ipv6 => "ipv6",
            Stat::Bytes => "bytes",
            Stat::Encapsulated => "encapsulated",
            Stat::EncapTooBig => "encap_too_big",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_list_is_complete_and_in_index_order() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
        assert_eq!(Stat::EncapTooBig as u32, STAT_COUNT - 1);
    }

    #[test]
    fn cid_hash_depends_on_every_byte_and_the_length() {
        let base = CidKey::new(&[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]).unwrap();
        let h = cid_hash(&base);
        assert_eq!(h, cid_hash(&base), "deterministic");
        for i in 0..8 {
            let mut k = base;
            k.bytes[i] ^= 1;
            assert_ne!(cid_hash(&k), h, "byte {i} must matter");
        }
        // Same bytes, different length (a trailing zero byte) must differ.
        let longer = CidKey::new(&[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0]).unwrap();
        assert_ne!(cid_hash(&longer), h);
    }

    #[test]
    fn key_words_lay_out_the_key_bytes_little_endian() {
        let key = CidKey::new(&(1..=20).collect::<std::vec::Vec<u8>>()).unwrap();
        let w = cid_key_words(&key);
        assert_eq!(w[0], u64::from_le_bytes([20, 1, 2, 3, 4, 5, 6, 7]));
        assert_eq!(w[1], u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]));
        assert_eq!(w[2], u64::from_le_bytes([16, 17, 18, 19, 20, 0, 0, 0]));
    }

    #[test]
    fn cid_hash_spreads_over_a_maglev_table() {
        // 20,000 sequential 8-byte CIDs over 7 buckets: each bucket within 10% of the mean.
        let mut buckets = [0u32; 7];
        for i in 0u64..20_000 {
            let k = CidKey::new(&i.to_be_bytes()).unwrap();
            buckets[(cid_hash(&k) % 7) as usize] += 1;
        }
        let mean = 20_000 / 7;
        for b in buckets {
            assert!(b.abs_diff(mean) < mean / 10, "uneven spread: {buckets:?}");
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, contain only integers and byte arrays, and have
    // explicit padding fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::LbConfig {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipValue {}
    unsafe impl aya::Pod for super::CidKey {}
    unsafe impl aya::Pod for super::WorkerRef {}
    unsafe impl aya::Pod for super::ServerIdKey {}
    unsafe impl aya::Pod for super::WorkerEntry {}
    unsafe impl aya::Pod for super::encap::EncapEntry {}
    unsafe impl aya::Pod for super::fastpath::FastPathState {}
    unsafe impl aya::Pod for super::fastpath::VipSlot {}
    unsafe impl aya::Pod for super::fastpath::VipTable {}
    unsafe impl aya::Pod for super::fastpath::ServerIdSlot {}
}
