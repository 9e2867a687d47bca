//! Types shared by Baton's XDP program (`lb-ebpf`) and userspace (`lb-user`, `worker`).
//!
//! Everything here is `no_std` and `#[repr(C)]` so the same definitions describe the BPF maps on
//! both sides. The BTF the XDP object carries names these structs, which is what makes
//! `bpftool map dump pinned /sys/fs/bpf/baton/<map>` print readable keys and values.
#![no_std]

pub mod cid;

pub use cid::{CidLayout, LayoutError, CR_UNROUTABLE, MAX_CID_LEN, MAX_SERVER_ID_LEN, MIN_NONCE_LEN};

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

pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;

/// Value of `BATON_VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipValue {
    /// Reserved for per-VIP flags; 1 = enabled.
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
        Some(Self { len: cid.len() as u8, bytes, _pad: [0; 3] })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..(self.len as usize).min(MAX_CID_LEN)]
    }
}

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
    /// UDP to a VIP with a truncated or malformed QUIC header: XDP_DROP.
    Malformed = 1,
    /// Routed by an exact-CID override.
    RoutedOverride = 2,
    /// Routed by the server ID encoded in the CID.
    RoutedServerId = 3,
    /// Routed by Maglev hashing (Initial/0-RTT, unknown server ID, unroutable CID, unknown version).
    RoutedHash = 4,
    /// The chosen worker had no usable entry, or no healthy worker exists: XDP_DROP.
    NoWorker = 5,
    /// `bpf_redirect_map` failed.
    RedirectError = 6,
    /// Forwarded with XDP_TX.
    Tx = 7,
    /// Forwarded with XDP_REDIRECT.
    Redirected = 8,
    /// IPv4 packets seen to a VIP.
    Ipv4 = 9,
    /// IPv6 packets seen to a VIP.
    Ipv6 = 10,
    /// Bytes forwarded to workers.
    Bytes = 11,
}

pub const STAT_COUNT: u32 = 12;

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
}
