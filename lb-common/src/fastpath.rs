//! Derived fast-path maps: array-map mirrors of `BATON_VIPS`, `BATON_SERVER_IDS` and per-bucket
//! counts of `BATON_CID_OVERRIDE` entries, so the XDP program's common path makes no hash-map
//! helper call (array lookups are inlined by the verifier/JIT; a hash lookup is a helper call
//! plus a jhash of the key, ~20 ns each on the benchmark machine).
//!
//! The existing maps stay authoritative (the controller's API; `baton route` runs the program on
//! them). The maps here are opt-in: each is used by the XDP program only while its flag is set in
//! [`FastPathState::flags`] (`BATON_FASTPATH`), and `lb_user::fastpath` sets a flag only after
//! it filled the map from the authoritative one. With every flag clear (a fresh map) the program
//! behaves exactly as without these maps.
//!
//! * `BATON_FASTPATH`: one [`FastPathState`] (array, `BPF_F_MMAPABLE`): flags, the CID layout the
//!   tables were built for, and the count of overrides outside any server-ID bucket. Userspace
//!   writes it through a shared mapping with atomic operations, so the CLI and the daemon can
//!   both count overrides without losing updates.
//! * `BATON_VIP_TABLE`: one [`VipTable`] (array): up to [`VIP_TABLE_SLOTS`] enabled VIPs, scanned
//!   by the program with a bounded loop instead of a hash lookup.
//! * `BATON_SERVER_ID_TABLE`: [`SERVER_ID_TABLE_SIZE`] [`ServerIdSlot`]s (array, mmapable) indexed
//!   by server ID when `server_id_len <= 2` (Katran's server_id_map is an array too): the worker
//!   ([`crate::NO_WORKER`] = unknown: hash) and how many overrides have a CID with that server ID.
//!
//! Override counts are upper bounds: a writer increments a bucket *before* it inserts an override
//! and decrements it *after* it deleted one, so at every instant the count is >= the number of
//! entries in the bucket, and a zero count proves the bucket empty. The program skips the
//! override lookup only on a zero count.
use crate::{CidKey, CidLayout, VipKey, cid_key_words};

/// Most VIPs (address, port) the array table holds; beyond that the program uses `BATON_VIPS`.
pub const VIP_TABLE_SLOTS: usize = 16;
/// Entries of `BATON_SERVER_ID_TABLE`: every server ID of at most [`SERVER_ID_TABLE_MAX_LEN`] bytes.
pub const SERVER_ID_TABLE_SIZE: u32 = 65536;
/// Longest server ID (bytes) the array table covers; longer ones use `BATON_SERVER_IDS`.
pub const SERVER_ID_TABLE_MAX_LEN: u8 = 2;
/// `BPF_F_MMAPABLE`: the array can be mapped into userspace memory.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// [`FastPathState::flags`]: `BATON_VIP_TABLE` holds every enabled VIP (else `BATON_VIPS` is used).
pub const FP_VIP_TABLE: u32 = 1;
/// `BATON_SERVER_ID_TABLE`'s `worker` fields mirror `BATON_SERVER_IDS` for the recorded layout.
pub const FP_SERVER_ID_TABLE: u32 = 2;
/// Override counts (per server ID in the table, and [`FastPathState::other_overrides`]) are
/// maintained upper bounds for the recorded layout: a zero count skips the override lookup.
pub const FP_OVERRIDE_COUNTS: u32 = 4;

/// The single entry of `BATON_FASTPATH`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPathState {
    /// `FP_*` bits.
    pub flags: u32,
    /// The layout (`LbConfig::cid_len`, `server_id_len`) the server-ID table and the override
    /// buckets were built for. The program ignores the table and the counts when `BATON_CONFIG`
    /// says otherwise, so a layout change without a rebuild costs speed, never correctness.
    /// Shares the first 8 bytes with `flags`: the program reads both with one load, so it never
    /// pairs one rebuild's flags with another's layout.
    pub cid_len: u8,
    pub server_id_len: u8,
    pub _pad: [u8; 2],
    /// Upper bound on overrides whose CID has no server-ID bucket (see [`override_bucket`]).
    pub other_overrides: u32,
    pub _pad2: u32,
    /// [`maglev_reciprocal`] of `LbConfig::maglev_size`, so the program reduces the CID hash
    /// modulo the table size with two multiplies instead of a 64-bit `div` (~10 ns here). The
    /// program checks it against the live `maglev_size` with [`reciprocal_matches`] on every
    /// packet and divides when it does not match, so it needs no ordering with config writes.
    pub maglev_reciprocal: u64,
}

/// Value of [`VipSlot::flags`] for an enabled slot; 0 = free. The program compares the slot's
/// last 8 bytes with (port, family, pad 0, flags 1) in one go, so no other value is ever written.
pub const VIP_SLOT_ENABLED: u32 = 1;

/// A VIP (`BATON_VIPS` key) and whether the slot is in use: 24 bytes, three words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipSlot {
    pub key: VipKey,
    /// [`VIP_SLOT_ENABLED`] or 0.
    pub flags: u32,
}

/// The single entry of `BATON_VIP_TABLE`. Slots keep their position while their VIP exists, so
/// rewriting the table for a VIP change never hides another VIP from a concurrent reader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipTable {
    /// Slots `0..count` are scanned (free ones have flags 0); at most [`VIP_TABLE_SLOTS`].
    pub count: u32,
    pub _pad: u32,
    pub slots: [VipSlot; VIP_TABLE_SLOTS],
}

/// Entry of `BATON_SERVER_ID_TABLE` (index = server ID).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerIdSlot {
    /// Index into `BATON_WORKERS`, or [`crate::NO_WORKER`]: no worker has this server ID.
    pub worker: u32,
    /// Upper bound on `BATON_CID_OVERRIDE` entries whose CID carries this server ID.
    pub overrides: u32,
}

/// Which override count covers a CID, for the layout `(cid_len, server_id_len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OverrideBucket {
    /// The CID carries this server ID (< [`SERVER_ID_TABLE_SIZE`]): `ServerIdSlot::overrides`.
    ServerId(u32),
    /// Anything else (unroutable, too short, layout with longer server IDs): `other_overrides`.
    Other,
}

/// The bucket of an override key: the same decode the XDP program runs on the packet's DCID
/// ([`CidLayout::decode_server_id_words`] over [`cid_key_words`]), so a packet and the override
/// for its DCID always meet in the same bucket.
pub fn override_bucket(cid_len: u8, server_id_len: u8, key: &CidKey) -> OverrideBucket {
    if server_id_len > SERVER_ID_TABLE_MAX_LEN {
        return OverrideBucket::Other;
    }
    match CidLayout::new(cid_len, server_id_len) {
        Ok(layout) => match layout.decode_server_id_words(&cid_key_words(key)) {
            Some(sid) if sid < SERVER_ID_TABLE_SIZE as u64 => OverrideBucket::ServerId(sid as u32),
            _ => OverrideBucket::Other,
        },
        Err(_) => OverrideBucket::Other,
    }
}

/// Lemire's "fastmod" constant for `d`: `ceil(2^64 / d)`, or 0 (never valid) for `d` < 2.
pub const fn maglev_reciprocal(d: u32) -> u64 {
    if d < 2 { 0 } else { (u64::MAX / d as u64) + 1 }
}

/// The high 64 bits of `x * d`, from 32-bit halves (BPF has no 128-bit multiply).
#[inline(always)]
const fn mulhi_u64_u32(x: u64, d: u32) -> u64 {
    let d = d as u64;
    ((x >> 32) * d + (((x & 0xffff_ffff) * d) >> 32)) >> 32
}

/// True iff `m` is [`maglev_reciprocal`]`(d)` for `d` >= 2: exactly that `m` puts `m * d` in
/// `[2^64, 2^64 + d)`. So a stale reciprocal (another table size) or a torn one is never used;
/// the program divides instead.
#[inline(always)]
pub const fn reciprocal_matches(m: u64, d: u32) -> bool {
    d >= 2 && mulhi_u64_u32(m, d) == 1 && m.wrapping_mul(d as u64) < d as u64
}

/// `a % d` given `m` = [`maglev_reciprocal`]`(d)`: the high 64 bits of `(m * a mod 2^64) * d`,
/// exact for every 32-bit `a` and `d` >= 2 (Lemire, Kaser, Kurz 2019).
#[inline(always)]
pub const fn fastmod_u32(a: u32, m: u64, d: u32) -> u32 {
    mulhi_u64_u32(m.wrapping_mul(a as u64), d) as u32
}

/// A [`VipSlot`]'s bytes as three little-endian words, as the program compares them: the
/// address in two, then port, family, pad and flags in the third.
pub fn vip_slot_words(slot: &VipSlot) -> [u64; 3] {
    let mut raw = [0u8; 24];
    raw[..16].copy_from_slice(&slot.key.addr);
    raw[16..18].copy_from_slice(&slot.key.port.to_ne_bytes());
    raw[18] = slot.key.family;
    raw[19] = slot.key._pad;
    raw[20..24].copy_from_slice(&slot.flags.to_ne_bytes());
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&raw[8 * i..8 * i + 8]);
        u64::from_ne_bytes(w)
    };
    [word(0), word(1), word(2)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_what_the_program_reads() {
        assert_eq!(size_of::<VipSlot>(), 24);
        assert_eq!(size_of::<VipTable>(), 8 + 24 * VIP_TABLE_SLOTS);
        assert_eq!(size_of::<ServerIdSlot>(), 8);
        assert_eq!(size_of::<FastPathState>(), 24);
        assert_eq!(core::mem::offset_of!(VipSlot, flags), 20);
        assert_eq!(
            core::mem::offset_of!(FastPathState, cid_len),
            4,
            "flags and layout in one word"
        );
        assert_eq!(core::mem::offset_of!(FastPathState, server_id_len), 5);
    }

    #[test]
    fn override_buckets_follow_the_server_id_decoder() {
        let layout = CidLayout::default();
        let mut cid = [0u8; 8];
        layout
            .encode(0, 0x0102, &[1, 2, 3, 4, 5], &mut cid)
            .unwrap();
        let key = CidKey::new(&cid).unwrap();
        assert_eq!(
            override_bucket(8, 2, &key),
            OverrideBucket::ServerId(0x0102)
        );
        // Unroutable config rotation, too short, or a layout with longer server IDs: Other.
        let mut unroutable = cid;
        unroutable[0] |= 0b111 << 5;
        assert_eq!(
            override_bucket(8, 2, &CidKey::new(&unroutable).unwrap()),
            OverrideBucket::Other
        );
        assert_eq!(
            override_bucket(8, 2, &CidKey::new(&cid[..2]).unwrap()),
            OverrideBucket::Other
        );
        assert_eq!(override_bucket(8, 3, &key), OverrideBucket::Other);
        assert_eq!(override_bucket(0, 2, &key), OverrideBucket::Other);
        // A one-byte server ID is the CID's second byte.
        assert_eq!(override_bucket(8, 1, &key), OverrideBucket::ServerId(0x01));
    }

    #[test]
    fn fastmod_is_exact_and_reciprocals_validate() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u32
        };
        assert!(!reciprocal_matches(maglev_reciprocal(1), 1));
        for d in [
            2u32,
            3,
            7,
            251,
            256,
            65535,
            65536,
            65537,
            1 << 31,
            u32::MAX - 1,
            u32::MAX,
        ] {
            let m = maglev_reciprocal(d);
            assert!(reciprocal_matches(m, d), "d={d}");
            assert!(!reciprocal_matches(m.wrapping_add(1), d), "d={d}");
            assert!(!reciprocal_matches(m.wrapping_sub(1), d), "d={d}");
            for a in [0, 1, d - 1, d, d.wrapping_add(1), u32::MAX, u32::MAX - 1] {
                assert_eq!(fastmod_u32(a, m, d), a % d, "{a} % {d}");
            }
            for _ in 0..20_000 {
                let a = next();
                assert_eq!(fastmod_u32(a, m, d), a % d, "{a} % {d}");
            }
        }
        // The reciprocal of another size never validates for this one.
        assert!(!reciprocal_matches(maglev_reciprocal(65537), 251));
        assert!(!reciprocal_matches(maglev_reciprocal(251), 65537));
        assert!(!reciprocal_matches(0, 65537));
        for d in 2..3000u32 {
            assert!(!reciprocal_matches(0, d));
            for e in [d - 1, d + 1, 2 * d, d / 2, d / 3, 3 * d] {
                assert!(
                    !reciprocal_matches(maglev_reciprocal(e), d) || e == d,
                    "{e} for {d}"
                );
            }
        }
    }

    #[test]
    fn vip_slot_words_put_flags_in_the_top_half_of_the_last_word() {
        let mut key = VipKey {
            port: 443,
            family: crate::AF_INET,
            ..Default::default()
        };
        key.addr[..4].copy_from_slice(&[10, 0, 0, 100]);
        let w = vip_slot_words(&VipSlot {
            key,
            flags: VIP_SLOT_ENABLED,
        });
        assert_eq!(w[0], u64::from_ne_bytes([10, 0, 0, 100, 0, 0, 0, 0]));
        assert_eq!(w[1], 0);
        assert_eq!(w[2] & 0xffff_ffff, 443 | (crate::AF_INET as u64) << 16);
        assert_eq!(w[2] >> 32, VIP_SLOT_ENABLED as u64);
    }
}
