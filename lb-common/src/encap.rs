//! Encapsulation of forwarded datagrams (per worker slot), so workers can sit on other subnets:
//! the `BATON_WORKER_ENCAP` entry layout, its validation (done where entries are written, never
//! per packet), and the header arithmetic both the XDP program and the tests use (IPv4 header
//! checksum, ones'-complement folding, the GUE source port).
//!
//! Checksums here work on native-endian loads of byte pairs: a ones'-complement sum is
//! byte-order independent (RFC 1071 §2(B)), so summing the 16-bit halves of words loaded from
//! memory and storing the folded result the same way gives the right bytes on any host. That
//! lets the XDP program build headers without a byte swap per field.

use crate::{AF_INET, AF_INET6};

/// Layer-2 direct server return (only the destination MAC changes), as before this map existed.
pub const ENCAP_NONE: u8 = 0;
/// IP in IP: an outer IPv4 (protocol 4 / 41) or IPv6 (next header 4 / 41) header.
pub const ENCAP_IPIP: u8 = 1;
/// Generic UDP Encapsulation (draft-ietf-intarea-gue, variant 0): outer IP, UDP, 4-byte GUE header.
pub const ENCAP_GUE: u8 = 2;

/// IP protocol numbers of the inner datagram, in the outer IP header (IPIP) or GUE's proto field.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;

pub const IPV4_HDR_LEN: u16 = 20;
pub const IPV6_HDR_LEN: u16 = 40;
pub const UDP_HDR_LEN: u16 = 8;
pub const GUE_HDR_LEN: u16 = 4;
/// Outer TTL / hop limit.
pub const OUTER_TTL: u8 = 64;
/// Low bits of the flow hash added to [`EncapEntry::gue_sport_base`].
pub const GUE_SPORT_MASK: u16 = 0x3fff;

/// Value of `BATON_WORKER_ENCAP` (index = worker index, as `BATON_WORKERS`). A zeroed entry
/// (what an upgrade over older pins, or an unused slot, holds) is [`ENCAP_NONE`]. The next-hop
/// MAC is `WorkerEntry::mac`, the egress `WorkerEntry::tx_port`, as for layer 2.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncapEntry {
    /// [`ENCAP_NONE`], [`ENCAP_IPIP`] or [`ENCAP_GUE`]. Any other value: dropped as `no_worker`.
    pub mode: u8,
    /// Family of the outer header: [`AF_INET`] or [`AF_INET6`]. Inner datagrams of either family
    /// are carried (the protocol number names the inner one).
    pub family: u8,
    pub _pad: u16,
    /// Largest outer IP datagram (total length, headers included) the path to the worker carries.
    pub mtu: u16,
    /// GUE: the outer UDP destination port (host order).
    pub gue_port: u16,
    /// GUE: outer UDP source port = base + (flow hash & [`GUE_SPORT_MASK`]) (host order).
    pub gue_sport_base: u16,
    pub _pad2: [u8; 6],
    /// Outer source (the LB's address on that path): IPv4 in the first 4 bytes, rest zero.
    pub src: [u8; 16],
    /// Outer destination (the worker's address), same form.
    pub dst: [u8; 16],
}

/// Why an [`EncapEntry`] may not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncapError {
    Mode,
    Family,
    /// Below the family's minimum link MTU (576 for IPv4 per RFC 791's reassembly floor, 1280 for IPv6).
    Mtu,
    /// GUE with port 0, or a source-port base that would wrap past 65535.
    GuePorts,
    /// IPv4 addresses must leave bytes 4..16 zero (the program reads only the first 4).
    Address,
}

impl core::fmt::Display for EncapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            EncapError::Mode => "unknown encapsulation mode",
            EncapError::Family => "outer family must be IPv4 or IPv6",
            EncapError::Mtu => "path MTU below the family's minimum (576 IPv4, 1280 IPv6)",
            EncapError::GuePorts => {
                "GUE needs a non-zero port and a source-port base <= 65535 - 0x3fff"
            }
            EncapError::Address => "an IPv4 outer address must have bytes 4..16 zero",
        })
    }
}

impl EncapEntry {
    /// Checks what the program trusts without checking per packet. Writers call this first.
    pub fn validate(&self) -> Result<(), EncapError> {
        match self.mode {
            ENCAP_NONE => return Ok(()),
            ENCAP_IPIP | ENCAP_GUE => {}
            _ => return Err(EncapError::Mode),
        }
        let min_mtu = match self.family {
            AF_INET => {
                if self.src[4..].iter().chain(&self.dst[4..]).any(|b| *b != 0) {
                    return Err(EncapError::Address);
                }
                576
            }
            AF_INET6 => 1280,
            _ => return Err(EncapError::Family),
        };
        if self.mtu < min_mtu {
            return Err(EncapError::Mtu);
        }
        if self.mode == ENCAP_GUE
            && (self.gue_port == 0 || self.gue_sport_base > u16::MAX - GUE_SPORT_MASK)
        {
            return Err(EncapError::GuePorts);
        }
        Ok(())
    }

    /// Bytes the encapsulation puts in front of the inner IP datagram (Ethernet excluded).
    #[inline(always)]
    pub const fn overhead(&self) -> u16 {
        let ip = if self.family == AF_INET6 {
            IPV6_HDR_LEN
        } else {
            IPV4_HDR_LEN
        };
        if self.mode == ENCAP_GUE {
            ip + UDP_HDR_LEN + GUE_HDR_LEN
        } else {
            ip
        }
    }
}

/// Adds the two 16-bit halves of a native-endian word loaded from memory to a running sum.
#[inline(always)]
pub const fn csum_add_word(sum: u64, w: u32) -> u64 {
    sum + (w & 0xffff) as u64 + (w >> 16) as u64
}

/// Folds a ones'-complement sum to 16 bits (not complemented).
#[inline(always)]
pub const fn csum_fold(sum: u64) -> u16 {
    let mut s = (sum & 0xffff_ffff) + (sum >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The 16-bit value whose memory bytes are `v` in network order, as a native-endian load sees it.
#[inline(always)]
pub const fn be16_native(v: u16) -> u16 {
    u16::from_ne_bytes(v.to_be_bytes())
}

/// The 20-byte outer IPv4 header (no options, ID 0, DF, TTL [`OUTER_TTL`]) as five words whose
/// memory bytes are the header, checksum included. `src`/`dst` are native loads of the 4 address
/// bytes.
#[inline(always)]
pub const fn ipv4_header_words(total_len: u16, protocol: u8, src: u32, dst: u32) -> [u32; 5] {
    let len = total_len.to_be_bytes();
    let w0 = u32::from_ne_bytes([0x45, 0, len[0], len[1]]);
    // Identification 0 is fine with DF set (RFC 6864 §4.1: atomic datagrams).
    let w1 = u32::from_ne_bytes([0, 0, 0x40, 0]);
    let w2 = u32::from_ne_bytes([OUTER_TTL, protocol, 0, 0]);
    let mut sum = csum_add_word(0, w0);
    sum = csum_add_word(sum, w1);
    sum = csum_add_word(sum, w2);
    sum = csum_add_word(sum, src);
    sum = csum_add_word(sum, dst);
    let csum = !csum_fold(sum);
    // The checksum's native value lands in bytes 10-11 (the upper half of word 2 in memory).
    let c = csum.to_ne_bytes();
    let w2 = u32::from_ne_bytes([OUTER_TTL, protocol, c[0], c[1]]);
    [w0, w1, w2, src, dst]
}

/// GUE outer UDP source port for a flow hash: spreads flows over ECMP paths and receive queues.
#[inline(always)]
pub const fn gue_source_port(base: u16, flow_hash: u32) -> u16 {
    base.wrapping_add(flow_hash as u16 & GUE_SPORT_MASK)
}

/// Hash of the inner flow for [`gue_source_port`]: the client's address (as two words, IPv4 in
/// the low bytes of the first) and the UDP port pair (a native load of the UDP header's first 4
/// bytes). The same mixer as the CID hash.
#[inline(always)]
pub fn flow_hash(addr: [u64; 2], ports: u32) -> u32 {
    crate::cid_hash_words(&[addr[0], addr[1], ports as u64])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 straight from the bytes, big-endian, as a receiver checks it.
    fn reference_checksum(bytes: &[u8]) -> u16 {
        let mut sum = 0u32;
        for c in bytes.chunks(2) {
            let hi = c[0] as u32;
            let lo = c.get(1).copied().unwrap_or(0) as u32;
            sum += hi << 8 | lo;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn header_bytes(w: [u32; 5]) -> std::vec::Vec<u8> {
        w.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn ipv4_header_is_well_formed_and_sums_to_zero() {
        let src = u32::from_ne_bytes([10, 1, 2, 3]);
        let dst = u32::from_ne_bytes([192, 168, 200, 254]);
        for (len, proto) in [(20u16, IPPROTO_IPIP), (1500, 17), (0xffff, IPPROTO_IPV6)] {
            let h = header_bytes(ipv4_header_words(len, proto, src, dst));
            assert_eq!(h[0], 0x45);
            assert_eq!(u16::from_be_bytes([h[2], h[3]]), len);
            assert_eq!(&h[4..8], &[0, 0, 0x40, 0], "ID 0, DF, offset 0");
            assert_eq!((h[8], h[9]), (64, proto));
            assert_eq!(&h[12..16], &[10, 1, 2, 3]);
            assert_eq!(&h[16..20], &[192, 168, 200, 254]);
            // A correct header checksums to 0 including its checksum field.
            assert_eq!(reference_checksum(&h), 0, "header {h:02x?}");
            let mut zeroed = h.clone();
            zeroed[10..12].fill(0);
            assert_eq!(
                u16::from_be_bytes([h[10], h[11]]),
                reference_checksum(&zeroed)
            );
        }
    }

    #[test]
    fn fold_matches_the_reference_on_native_words() {
        let bytes: std::vec::Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
        let mut sum = 0u64;
        for c in bytes.chunks(4) {
            sum = csum_add_word(sum, u32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
        }
        let native = !csum_fold(sum);
        assert_eq!(
            u16::from_be_bytes(native.to_ne_bytes()),
            reference_checksum(&bytes)
        );
        assert_eq!(csum_fold(0xffff_ffff_ffff_ffff), 0xffff);
        assert_eq!(csum_fold(0x1_0000), 1);
        assert_eq!(be16_native(0x1234).to_ne_bytes(), [0x12, 0x34]);
    }

    #[test]
    fn gue_source_ports_stay_in_range_and_spread() {
        let base = 0xc000;
        let mut seen = std::collections::HashSet::new();
        for port in 0..2000u32 {
            let h = flow_hash([0x0700_02c0, 0], port << 16 | 0xbb01);
            let p = gue_source_port(base, h);
            assert!((base..=base + GUE_SPORT_MASK).contains(&p));
            seen.insert(p);
        }
        assert!(seen.len() > 1800, "only {} distinct ports", seen.len());
        assert_eq!(gue_source_port(0xc000, 0xffff_ffff), 0xffff);
    }

    #[test]
    fn validation_rejects_what_the_program_trusts() {
        let mut e = EncapEntry {
            mode: ENCAP_GUE,
            family: AF_INET,
            mtu: 1500,
            gue_port: 6080,
            gue_sport_base: 0xc000,
            ..Default::default()
        };
        e.src[..4].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(e.validate(), Ok(()));
        assert_eq!(e.overhead(), 32);
        assert_eq!(EncapEntry::default().validate(), Ok(()));
        let bad = |f: fn(&mut EncapEntry)| {
            let mut x = e;
            f(&mut x);
            x.validate().unwrap_err()
        };
        assert_eq!(bad(|x| x.mode = 3), EncapError::Mode);
        assert_eq!(bad(|x| x.family = 0), EncapError::Family);
        assert_eq!(bad(|x| x.mtu = 575), EncapError::Mtu);
        assert_eq!(
            bad(|x| {
                x.family = AF_INET6;
                x.mtu = 1279
            }),
            EncapError::Mtu
        );
        assert_eq!(bad(|x| x.gue_port = 0), EncapError::GuePorts);
        assert_eq!(bad(|x| x.gue_sport_base = 0xc001), EncapError::GuePorts);
        assert_eq!(bad(|x| x.dst[5] = 1), EncapError::Address);
        let mut ipip6 = e;
        ipip6.mode = ENCAP_IPIP;
        ipip6.family = AF_INET6;
        ipip6.mtu = 1280;
        ipip6.gue_port = 0;
        assert_eq!(ipip6.validate(), Ok(()));
        assert_eq!(ipip6.overhead(), 40);
    }
}
