//! Packet fixtures for the XDP router (Katran's approach): crafted frames go through the loaded
//! `baton_xdp` with BPF_PROG_TEST_RUN; we check the verdict, the rewritten frame and the counters.
//! Needs root. Each test loads its own copy of the object with maps pinned under
//! `/sys/fs/bpf/baton-fixture-<test>-<pid>` (never the daemon's /sys/fs/bpf/baton), removed after.
// Worker indices pick from several parallel tables (SID, MACS, verdicts): index loops read best.
#![allow(clippy::needless_range_loop)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    AF_INET, AF_INET6, CidKey, CidLayout, LbConfig, NO_WORKER, QUIC_V1, QUIC_V2, Stat,
    TX_SAME_IFACE, VipKey, WORKER_HEALTHY, WORKER_IN_USE, WorkerEntry, cid_hash,
};
use lb_user::testrun::frames::{
    Datagram, IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_ESP, IPPROTO_HOPOPTS, IPPROTO_ROUTING,
    IPPROTO_TCP, LongType, ext_header, fragment_header, quic_long, quic_short,
};
use lb_user::testrun::{TestRunOutput, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, XdpFixture};

const PROG: &str = "baton_xdp";
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const PORT: u16 = 443;
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const MACS: [[u8; 6]; 3] = [
    [0x02, 0xaa, 0, 0, 0, 0],
    [0x02, 0xbb, 0, 0, 0, 1],
    [0x02, 0xcc, 0, 0, 0, 2],
];
/// Worker 0 is redirected through devmap slot 0, worker 1 sits behind the receiving interface
/// (XDP_TX), worker 2 points at an empty devmap slot (redirect error).
const SID: [u64; 3] = [0x0101, 0x0202, 0x0303];
const MAGLEV_SIZE: u32 = 251;

fn layout() -> CidLayout {
    CidLayout::default()
}

/// An 8-byte server CID for `server_id` (config rotation `cr`).
fn server_cid(cr: u8, server_id: u64, nonce: u8) -> [u8; 8] {
    let mut cid = [0u8; 8];
    layout()
        .encode(cr, server_id, &[nonce, 1, 2, 3, nonce], &mut cid)
        .unwrap();
    cid
}

fn maglev_table() -> Vec<u32> {
    // Workers 0 and 1 only: the hashed tests must never land on the broken worker 2.
    (0..MAGLEV_SIZE)
        .map(|i| if i % 3 == 0 { 1 } else { 0 })
        .collect()
}

fn setup(test: &str) -> XdpFixture {
    let mut f =
        XdpFixture::load(&format!("fixture-{test}")).expect("load the XDP object (are you root?)");
    let cfg = LbConfig {
        cid_len: 8,
        server_id_len: 2,
        ready: 1,
        _pad: 0,
        maglev_size: MAGLEV_SIZE,
    };
    f.set_config(cfg).unwrap();
    let mut v4 = VipKey {
        port: PORT,
        family: AF_INET,
        ..Default::default()
    };
    v4.addr[..4].copy_from_slice(&VIP4.octets());
    f.add_vip(v4).unwrap();
    f.add_vip(VipKey {
        addr: VIP6.octets(),
        port: PORT,
        family: AF_INET6,
        _pad: 0,
    })
    .unwrap();
    let tx = [0, TX_SAME_IFACE, 9];
    for w in 0..3 {
        let entry = WorkerEntry {
            mac: MACS[w],
            flags: WORKER_IN_USE | WORKER_HEALTHY,
            tx_port: tx[w],
            _pad: 0,
            server_id: SID[w],
        };
        f.set_worker(w as u32, entry).unwrap();
        f.set_server_id(SID[w], w as u32).unwrap();
    }
    // Devmap slot 0 → the loopback device (exists everywhere; the test run does not transmit).
    f.set_tx_port(0, 1).unwrap();
    f.set_maglev(&maglev_table()).unwrap();
    f
}

fn v4(payload: Vec<u8>) -> Datagram {
    Datagram::udp(IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), PORT, payload)
}

fn v6(payload: Vec<u8>) -> Datagram {
    Datagram::udp(IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), PORT, payload)
}

/// The worker a forwarded frame went to, read from its new destination MAC.
fn worker_of(out: &TestRunOutput) -> usize {
    MACS.iter()
        .position(|m| out.frame[..6] == m[..])
        .unwrap_or_else(|| panic!("unknown dst MAC {:02x?}", &out.frame[..6]))
}

/// The worker the Maglev table names for `dcid`.
fn hashed_worker(dcid: &[u8]) -> usize {
    maglev_table()[(cid_hash(&CidKey::new(dcid).unwrap()) % MAGLEV_SIZE) as usize] as usize
}

fn expected_action(worker: usize) -> u32 {
    [XDP_REDIRECT, XDP_TX, XDP_DROP][worker]
}

/// Runs `frame` and asserts it was forwarded to `worker` with both MACs rewritten and the rest
/// of the frame untouched.
fn assert_forwarded(f: &XdpFixture, frame: &[u8], worker: usize) -> TestRunOutput {
    let out = f.run(PROG, frame).unwrap();
    assert_eq!(out.action, expected_action(worker), "verdict");
    assert_eq!(out.frame.len(), frame.len());
    assert_eq!(
        &out.frame[..6],
        &MACS[worker],
        "destination MAC = the worker's"
    );
    assert_eq!(
        &out.frame[6..12],
        &LB_MAC,
        "source MAC = the MAC the frame was sent to (ours)"
    );
    assert_eq!(
        &out.frame[12..],
        &frame[12..],
        "nothing but the MACs changes"
    );
    out
}

struct Stats(Vec<u64>);

fn stats(f: &XdpFixture) -> Stats {
    Stats(Stat::ALL.iter().map(|s| f.stat(*s).unwrap()).collect())
}

impl Stats {
    fn delta(&self, after: &Stats, stat: Stat) -> u64 {
        after.0[stat as usize] - self.0[stat as usize]
    }
}

#[test]
fn override_hit_wins_over_server_id_and_deleting_it_restores_the_route() {
    let mut f = setup("override");
    let cid = server_cid(0, SID[0], 9);
    let frame = v4(quic_short(&cid, 30)).build();
    f.set_override(&cid, 1).unwrap();
    let before = stats(&f);
    assert_forwarded(&f, &frame, 1);
    let after = stats(&f);
    assert_eq!(before.delta(&after, Stat::RoutedOverride), 1);
    assert_eq!(before.delta(&after, Stat::RoutedServerId), 0);
    assert_eq!(before.delta(&after, Stat::Tx), 1);

    f.del_override(&cid).unwrap();
    assert_forwarded(&f, &frame, 0);
    let last = stats(&f);
    assert_eq!(after.delta(&last, Stat::RoutedServerId), 1);
    assert_eq!(after.delta(&last, Stat::Redirected), 1);
}

#[test]
fn override_for_a_cid_with_an_unknown_server_id() {
    let mut f = setup("override-unknown");
    let cid = server_cid(0, 0x4242, 1);
    f.set_override(&cid, 0).unwrap();
    assert_forwarded(&f, &v4(quic_short(&cid, 30)).build(), 0);
}

#[test]
fn short_header_routes_by_server_id_and_counts() {
    let f = setup("server-id");
    for (w, sid) in SID.iter().enumerate().take(2) {
        let frame = v4(quic_short(&server_cid(2, *sid, 5), 40)).build();
        let before = stats(&f);
        assert_forwarded(&f, &frame, w);
        let after = stats(&f);
        assert_eq!(before.delta(&after, Stat::RoutedServerId), 1);
        assert_eq!(before.delta(&after, Stat::Ipv4), 1);
        assert_eq!(before.delta(&after, Stat::Bytes), frame.len() as u64);
        assert_eq!(before.delta(&after, [Stat::Redirected, Stat::Tx][w]), 1);
        assert_eq!(
            before.delta(&after, Stat::Passed) + before.delta(&after, Stat::Malformed),
            0
        );
    }
}

#[test]
fn unknown_server_id_and_unroutable_cids_fall_back_to_maglev() {
    let f = setup("unknown-sid");
    for cid in [server_cid(0, 0x7777, 1), server_cid(0, 0x7778, 2), {
        let mut c = server_cid(0, SID[0], 3);
        c[0] |= 0b111 << 5; // config rotation 7: "unroutable", must not use the server ID
        c
    }] {
        let before = stats(&f);
        assert_forwarded(&f, &v4(quic_short(&cid, 30)).build(), hashed_worker(&cid));
        assert_eq!(before.delta(&stats(&f), Stat::RoutedHash), 1);
    }
}

#[test]
fn initial_and_0rtt_are_hashed_by_dcid_consistently_and_spread() {
    let f = setup("initial");
    let mut seen = [0usize; 2];
    for i in 0u64..64 {
        // Client-chosen DCIDs: random-looking, 8 or 12 bytes.
        let mut dcid = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555)
            .to_be_bytes()
            .to_vec();
        if i % 2 == 1 {
            dcid.extend_from_slice(&[1, 2, 3, 4]);
        }
        let kind = if i % 4 == 3 {
            LongType::ZeroRtt
        } else {
            LongType::Initial
        };
        let frame = v4(quic_long(kind, QUIC_V1, &dcid, &[7; 8], 1200)).build();
        let before = stats(&f);
        let first = assert_forwarded(&f, &frame, hashed_worker(&dcid));
        let again = f.run(PROG, &frame).unwrap();
        assert_eq!(
            (first.action, &first.frame),
            (again.action, &again.frame),
            "same DCID → same worker"
        );
        assert_eq!(before.delta(&stats(&f), Stat::RoutedHash), 2);
        seen[worker_of(&first)] += 1;
    }
    assert!(
        seen[0] > 10 && seen[1] > 5,
        "64 DCIDs should reach both workers: {seen:?}"
    );
}

#[test]
fn initial_carrying_a_server_cid_follows_the_server_id() {
    // After the server's first Initial the client uses the server's CID in its Initials too.
    let f = setup("initial-server-cid");
    for w in 0..2 {
        let cid = server_cid(0, SID[w], 7);
        let frame = v4(quic_long(LongType::Initial, QUIC_V1, &cid, &[3; 8], 1200)).build();
        let before = stats(&f);
        assert_forwarded(&f, &frame, w);
        assert_eq!(before.delta(&stats(&f), Stat::RoutedServerId), 1);
    }
}

#[test]
fn handshake_routes_by_server_id_in_v1_and_v2() {
    let f = setup("handshake");
    for version in [QUIC_V1, QUIC_V2] {
        for w in 0..2 {
            let cid = server_cid(1, SID[w], 4);
            let frame = v4(quic_long(LongType::Handshake, version, &cid, &[9; 8], 300)).build();
            let before = stats(&f);
            assert_forwarded(&f, &frame, w);
            assert_eq!(before.delta(&stats(&f), Stat::RoutedServerId), 1);
        }
        // A v2 Initial (type bits 01, which would be 0-RTT in v1) is still hashed.
        let dcid = [0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5];
        assert_forwarded(
            &f,
            &v4(quic_long(LongType::Initial, version, &dcid, &[], 1200)).build(),
            hashed_worker(&dcid),
        );
    }
}

#[test]
fn handshake_with_an_unknown_server_id_is_hashed() {
    let f = setup("handshake-unknown");
    let cid = server_cid(0, 0x5150, 4);
    assert_forwarded(
        &f,
        &v4(quic_long(LongType::Handshake, QUIC_V1, &cid, &[9; 8], 300)).build(),
        hashed_worker(&cid),
    );
}

#[test]
fn unknown_versions_are_hashed_even_with_long_dcids() {
    let f = setup("unknown-version");
    let long_dcid: Vec<u8> = (0..40).collect();
    for (version, dcid) in [
        (0xff00_001d, &long_dcid[..8]),
        (0x1a2a_3a4a, &long_dcid[..]),
        (0, &long_dcid[..12]),
    ] {
        let frame = v4(quic_long(LongType::Handshake, version, dcid, &[1; 4], 200)).build();
        let before = stats(&f);
        // DCIDs past 20 bytes are hashed on their first 20.
        assert_forwarded(&f, &frame, hashed_worker(&dcid[..dcid.len().min(20)]));
        assert_eq!(before.delta(&stats(&f), Stat::RoutedHash), 1);
    }
}

#[test]
fn retry_and_oversized_v1_dcids_are_dropped_as_malformed() {
    let f = setup("retry");
    let before = stats(&f);
    let retry = v4(quic_long(
        LongType::Retry,
        QUIC_V1,
        &server_cid(0, SID[0], 1),
        &[1; 8],
        100,
    ))
    .build();
    assert_eq!(f.run(PROG, &retry).unwrap().action, XDP_DROP);
    let dcid: Vec<u8> = (0..21).collect();
    let too_long = v4(quic_long(LongType::Initial, QUIC_V1, &dcid, &[1; 8], 1200)).build();
    assert_eq!(f.run(PROG, &too_long).unwrap().action, XDP_DROP);
    assert_eq!(before.delta(&stats(&f), Stat::Malformed), 2);
}

#[test]
fn ipv6_short_initial_and_handshake() {
    let f = setup("ipv6");
    for w in 0..2 {
        let cid = server_cid(0, SID[w], 8);
        let before = stats(&f);
        assert_forwarded(&f, &v6(quic_short(&cid, 30)).build(), w);
        assert_forwarded(
            &f,
            &v6(quic_long(LongType::Handshake, QUIC_V1, &cid, &[1; 8], 300)).build(),
            w,
        );
        let after = stats(&f);
        assert_eq!(before.delta(&after, Stat::RoutedServerId), 2);
        assert_eq!(before.delta(&after, Stat::Ipv6), 2);
        assert_eq!(before.delta(&after, Stat::Ipv4), 0);
    }
    let dcid = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];
    let frame = v6(quic_long(LongType::Initial, QUIC_V1, &dcid, &[2; 8], 1200)).build();
    assert_forwarded(&f, &frame, hashed_worker(&dcid));
    let cid = server_cid(0, 0x6666, 1);
    assert_forwarded(&f, &v6(quic_short(&cid, 30)).build(), hashed_worker(&cid));
}

/// Cuts `d`'s frame at every length short of whole and checks each verdict: until the UDP
/// destination port is readable the packet cannot be told apart from other traffic and passes;
/// from there on it is VIP traffic and a short frame is malformed: dropped and counted.
fn check_every_truncation(f: &XdpFixture, d: &Datagram) {
    let frame = d.build();
    let (_, l4, _) = d.offsets();
    let identifiable = l4 + 4;
    let before = stats(f);
    let (mut passed, mut dropped) = (0, 0);
    for len in 0..frame.len() {
        let out = match f.run(PROG, &frame[..len]) {
            Ok(out) => out,
            // The kernel refuses test frames shorter than an Ethernet header (6.18 does, even
            // with XDP metadata in front), so those lengths cannot be run here. No real device
            // hands XDP a runt; the program's own 14-byte check is still proven by the verifier.
            Err(e) if len < 14 && is_einval(&e) => continue,
            Err(e) => panic!("test run at length {len}: {e:#}"),
        };
        let want = if len < identifiable {
            XDP_PASS
        } else {
            XDP_DROP
        };
        assert_eq!(
            out.action,
            want,
            "frame cut to {len} of {} bytes (port readable from {identifiable})",
            frame.len()
        );
        assert_eq!(
            out.frame,
            frame[..len],
            "a truncated frame is never modified (length {len})"
        );
        if want == XDP_PASS {
            passed += 1
        } else {
            dropped += 1
        }
    }
    let after = stats(f);
    assert_eq!(before.delta(&after, Stat::Passed), passed);
    assert_eq!(before.delta(&after, Stat::Malformed), dropped);
    // The whole frame still routes.
    assert_ne!(f.run(PROG, &frame).unwrap().action, XDP_PASS);
}

fn is_einval(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidInput)
}

#[test]
fn every_truncation_of_ipv4_short_header() {
    let f = setup("trunc-v4-short");
    check_every_truncation(&f, &v4(quic_short(&server_cid(0, SID[0], 1), 4)));
}

#[test]
fn every_truncation_of_ipv4_initial() {
    let f = setup("trunc-v4-initial");
    check_every_truncation(
        &f,
        &v4(quic_long(LongType::Initial, QUIC_V1, &[5; 8], &[6; 8], 40)),
    );
}

#[test]
fn every_truncation_of_ipv4_with_options() {
    let f = setup("trunc-v4-opts");
    let mut d = v4(quic_long(
        LongType::Handshake,
        QUIC_V1,
        &server_cid(0, SID[1], 1),
        &[6; 8],
        30,
    ));
    d.ipv4_options = vec![0x01; 12]; // NOPs: IHL 8
    check_every_truncation(&f, &d);
}

#[test]
fn every_truncation_of_ipv6_short_and_long_header() {
    let f = setup("trunc-v6");
    check_every_truncation(&f, &v6(quic_short(&server_cid(0, SID[0], 1), 4)));
    check_every_truncation(
        &f,
        &v6(quic_long(LongType::Initial, QUIC_V2, &[5; 20], &[6; 8], 50)),
    );
}

#[test]
fn ipv4_options_are_skipped_by_ihl() {
    let f = setup("ipv4-options");
    for opt_len in [4, 8, 20, 40] {
        for w in 0..2 {
            let mut d = v4(quic_short(&server_cid(0, SID[w], 2), 30));
            d.ipv4_options = vec![0x01; opt_len];
            assert_forwarded(&f, &d.build(), w);
        }
    }
}

#[test]
fn not_udp_to_a_vip_port_passes_untouched() {
    let f = setup("pass");
    let quic = quic_short(&server_cid(0, SID[0], 1), 30);
    let mut cases = Vec::new();
    let mut tcp = v4(quic.clone());
    tcp.protocol = IPPROTO_TCP;
    cases.push(("TCP to the VIP", tcp.build()));
    let mut wrong_port = v4(quic.clone());
    wrong_port.dst_port = 444;
    cases.push(("UDP to another port", wrong_port.build()));
    let mut wrong_port6 = v6(quic.clone());
    wrong_port6.dst_port = 8443;
    cases.push(("IPv6 UDP to another port", wrong_port6.build()));
    let other = Datagram::udp(
        IpAddr::V4(CLIENT4),
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 101)),
        PORT,
        quic.clone(),
    );
    cases.push(("UDP to another address", other.build()));
    let mut arp = v4(quic.clone()).build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    cases.push(("ARP", arp));
    let mut fragment = v4(quic.clone()).build();
    fragment[14 + 6..14 + 8].copy_from_slice(&0x0010u16.to_be_bytes()); // offset 128 bytes
    cases.push(("non-first IPv4 fragment", fragment));
    for (what, frame) in cases {
        let before = stats(&f);
        let out = f.run(PROG, &frame).unwrap();
        assert_eq!(out.action, XDP_PASS, "{what}");
        assert_eq!(out.frame, frame, "{what} must pass untouched");
        assert_eq!(before.delta(&stats(&f), Stat::Passed), 1, "{what}");
    }
}

#[test]
fn first_fragment_and_bad_udp_length_to_a_vip_are_malformed() {
    let f = setup("malformed");
    let quic = quic_short(&server_cid(0, SID[0], 1), 30);
    let mut first_fragment = v4(quic.clone()).build();
    first_fragment[14 + 6] = 0x20; // MF, offset 0
    let mut udp_too_long = v4(quic.clone()).build();
    udp_too_long[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&2000u16.to_be_bytes());
    let mut udp_too_short = v4(quic.clone()).build();
    udp_too_short[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&8u16.to_be_bytes());
    let mut header_past_udp_len = v4(quic.clone()).build();
    header_past_udp_len[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&(8u16 + 5).to_be_bytes());
    for (what, frame) in [
        ("first fragment", first_fragment),
        ("UDP length past the frame", udp_too_long),
        ("empty UDP payload", udp_too_short),
        (
            "QUIC header longer than the UDP length",
            header_past_udp_len,
        ),
    ] {
        let before = stats(&f);
        assert_eq!(f.run(PROG, &frame).unwrap().action, XDP_DROP, "{what}");
        assert_eq!(before.delta(&stats(&f), Stat::Malformed), 1, "{what}");
    }
}

fn v6_ext(payload: Vec<u8>, ext: &[(u8, Vec<u8>)]) -> Datagram {
    let mut d = v6(payload);
    d.ipv6_ext_headers = ext.to_vec();
    d
}

/// One IPv6 extension header as the frame builder takes it: its protocol number and its bytes.
type ExtHeader = (u8, Vec<u8>);

/// The IPv6 datagrams with extension headers the fixtures send, each with the packet it must be
/// routed like (short header by server ID, long header by hash).
fn ipv6_chains() -> Vec<(&'static str, Vec<ExtHeader>)> {
    vec![
        ("hop-by-hop", vec![ext_header(IPPROTO_HOPOPTS, 1, 0)]),
        (
            "destination options, routing (segments left 0)",
            vec![
                ext_header(IPPROTO_DSTOPTS, 2, 0),
                ext_header(IPPROTO_ROUTING, 3, 0),
            ],
        ),
        (
            "hop-by-hop, AH, destination options",
            vec![
                ext_header(IPPROTO_HOPOPTS, 1, 0),
                // AH with a 12-byte ICV: payload length (in 4-byte units, minus 2) = 4.
                (IPPROTO_AH, {
                    let mut h = vec![0u8; 24];
                    h[1] = 4;
                    h
                }),
                ext_header(IPPROTO_DSTOPTS, 1, 0),
            ],
        ),
        (
            "six headers (the limit), one of 2 KiB",
            vec![
                ext_header(IPPROTO_HOPOPTS, 1, 0),
                ext_header(IPPROTO_DSTOPTS, 256, 0),
                ext_header(IPPROTO_ROUTING, 1, 0),
                ext_header(IPPROTO_DSTOPTS, 1, 0),
                ext_header(IPPROTO_DSTOPTS, 1, 0),
                ext_header(IPPROTO_DSTOPTS, 1, 0),
            ],
        ),
    ]
}

#[test]
fn ipv6_extension_headers_to_a_vip_are_walked_and_routed_as_without_them() {
    let f = setup("ipv6-ext");
    for (what, chain) in ipv6_chains() {
        for w in 0..2 {
            let quic = quic_short(&server_cid(0, SID[w], 3), 30);
            let plain = f.run(PROG, &v6(quic.clone()).build()).unwrap();
            let before = stats(&f);
            assert_forwarded(&f, &v6_ext(quic, &chain).build(), w);
            let after = stats(&f);
            assert_eq!(worker_of(&plain), w, "{what}: plain IPv6 baseline");
            assert_eq!(before.delta(&after, Stat::RoutedServerId), 1, "{what}");
            assert_eq!(before.delta(&after, Stat::Ipv6), 1, "{what}");
        }
        let dcid = [0x5a; 12];
        let initial = quic_long(LongType::Initial, QUIC_V1, &dcid, &[1; 8], 1200);
        let before = stats(&f);
        assert_forwarded(&f, &v6_ext(initial, &chain).build(), hashed_worker(&dcid));
        assert_eq!(before.delta(&stats(&f), Stat::RoutedHash), 1, "{what}");
    }
}

#[test]
fn every_truncation_of_ipv6_with_extension_headers() {
    let f = setup("trunc-v6-ext");
    for (_, chain) in ipv6_chains().into_iter().take(3) {
        check_every_truncation(
            &f,
            &v6_ext(quic_short(&server_cid(0, SID[0], 1), 4), &chain),
        );
    }
}

#[test]
fn ipv6_fragments_and_transit_routing_to_a_vip_are_dropped_as_malformed() {
    let f = setup("ipv6-frag");
    let quic = quic_short(&server_cid(0, SID[0], 1), 30);
    for (what, chain) in [
        ("first fragment", vec![fragment_header(0, true)]),
        (
            "first fragment behind hop-by-hop, before destination options",
            vec![
                ext_header(IPPROTO_HOPOPTS, 1, 0),
                fragment_header(0, true),
                ext_header(IPPROTO_DSTOPTS, 1, 0),
            ],
        ),
        (
            "atomic fragment (offset 0, no M)",
            vec![fragment_header(0, false)],
        ),
        (
            "routing header with segments left (the VIP is a transit hop)",
            vec![ext_header(IPPROTO_ROUTING, 3, 1)],
        ),
        (
            "hop-by-hop not first",
            vec![
                ext_header(IPPROTO_DSTOPTS, 1, 0),
                ext_header(IPPROTO_HOPOPTS, 1, 0),
            ],
        ),
    ] {
        let frame = v6_ext(quic.clone(), &chain).build();
        let before = stats(&f);
        let out = f.run(PROG, &frame).unwrap();
        assert_eq!(out.action, XDP_DROP, "{what}");
        assert_eq!(out.frame, frame, "{what}: dropped untouched");
        let after = stats(&f);
        assert_eq!(before.delta(&after, Stat::Ipv6), 1, "{what}");
        assert_eq!(before.delta(&after, Stat::Malformed), 1, "{what}");
        assert_eq!(before.delta(&after, Stat::Passed), 0, "{what}");

        // The same datagram to an address that is not a VIP is none of our business.
        let mut other = v6_ext(quic.clone(), &chain);
        other.dst = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x101));
        let frame = other.build();
        let before = stats(&f);
        let out = f.run(PROG, &frame).unwrap();
        assert_eq!(out.action, XDP_PASS, "{what}, not to a VIP");
        assert_eq!(out.frame, frame, "{what}, not to a VIP: untouched");
        assert_eq!(before.delta(&stats(&f), Stat::Passed), 1, "{what}");
    }
}

/// Datagrams to the VIP address whose port cannot be read, but that no QUIC client sends.
fn ipv6_portless(quic: &[u8]) -> Vec<(&'static str, Datagram)> {
    let seven: Vec<_> = (0..7).map(|_| ext_header(IPPROTO_DSTOPTS, 1, 0)).collect();
    vec![
        // What follows a non-first fragment header is the middle of the datagram: no port.
        (
            "non-first fragment",
            v6_ext(quic.to_vec(), &[fragment_header(16, true)]),
        ),
        (
            "last fragment behind hop-by-hop",
            v6_ext(
                quic.to_vec(),
                &[
                    ext_header(IPPROTO_HOPOPTS, 1, 0),
                    fragment_header(16, false),
                ],
            ),
        ),
        ("seven extension headers", v6_ext(quic.to_vec(), &seven)),
    ]
}

#[test]
fn ipv6_portless_fragments_and_long_chains_to_a_vip_address_are_dropped() {
    let mut f = setup("ipv6-portless");
    let quic = quic_short(&server_cid(0, SID[0], 1), 30);
    for (what, d) in ipv6_portless(&quic) {
        let frame = d.build();
        let before = stats(&f);
        let out = f.run(PROG, &frame).unwrap();
        assert_eq!(out.action, XDP_DROP, "{what}");
        assert_eq!(out.frame, frame, "{what}: dropped untouched");
        let after = stats(&f);
        assert_eq!(before.delta(&after, Stat::Ipv6), 1, "{what}");
        assert_eq!(before.delta(&after, Stat::Malformed), 1, "{what}");

        // Any port: the address is what is known.
        let mut other_port = d.clone();
        other_port.dst_port = 8443;
        assert_eq!(
            f.run(PROG, &other_port.build()).unwrap().action,
            XDP_DROP,
            "{what}"
        );

        let mut other = d.clone();
        other.dst = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x101));
        let frame = other.build();
        let before = stats(&f);
        let out = f.run(PROG, &frame).unwrap();
        assert_eq!(out.action, XDP_PASS, "{what}, not to a VIP");
        assert_eq!(out.frame, frame, "{what}, not to a VIP: untouched");
        assert_eq!(before.delta(&stats(&f), Stat::Passed), 1, "{what}");
    }
    // The same with the fast-path maps off: the address index is not one of them.
    f.disable_fastpath();
    for (what, d) in ipv6_portless(&quic) {
        assert_eq!(
            f.run(PROG, &d.build()).unwrap().action,
            XDP_DROP,
            "{what}, hash maps"
        );
    }
    f.enable_fastpath().unwrap();
    // Once the address has no VIP left, they are none of our business.
    let vip6 = VipKey {
        addr: VIP6.octets(),
        port: PORT,
        family: AF_INET6,
        _pad: 0,
    };
    f.del_vip(&vip6).unwrap();
    for (what, d) in ipv6_portless(&quic) {
        assert_eq!(
            f.run(PROG, &d.build()).unwrap().action,
            XDP_PASS,
            "{what}, VIP removed"
        );
    }
    f.add_vip(vip6).unwrap();
    for (what, d) in ipv6_portless(&quic) {
        assert_eq!(
            f.run(PROG, &d.build()).unwrap().action,
            XDP_DROP,
            "{what}, VIP back"
        );
    }
}

#[test]
fn ipv6_without_a_udp_header_passes_untouched() {
    let f = setup("ipv6-ext-pass");
    let quic = quic_short(&server_cid(0, SID[0], 1), 30);
    let mut esp = v6(quic.clone());
    esp.protocol = IPPROTO_ESP;
    let mut esp_behind_hbh = v6_ext(quic.clone(), &[ext_header(IPPROTO_HOPOPTS, 1, 0)]);
    esp_behind_hbh.protocol = IPPROTO_ESP;
    let mut other_vip_port = v6_ext(quic.clone(), &[ext_header(IPPROTO_HOPOPTS, 1, 0)]);
    other_vip_port.dst_port = 8443;
    for (what, frame) in [
        ("ESP", esp.build()),
        ("ESP behind hop-by-hop", esp_behind_hbh.build()),
        ("hop-by-hop, UDP to another port", other_vip_port.build()),
    ] {
        let before = stats(&f);
        let out = f.run(PROG, &frame).unwrap();
        assert_eq!(out.action, XDP_PASS, "{what}");
        assert_eq!(out.frame, frame, "{what} must pass untouched");
        assert_eq!(before.delta(&stats(&f), Stat::Passed), 1, "{what}");
    }
}

#[test]
fn ethernet_padding_after_the_datagram_is_ignored() {
    let f = setup("padding");
    let mut frame = v4(quic_short(&server_cid(0, SID[1], 1), 2)).build();
    frame.extend_from_slice(&[0; 18]);
    assert_forwarded(&f, &frame, 1);
}

/// Collects aya-log records from the XDP program.
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

#[test]
fn redirect_errors_and_missing_workers_drop_and_count() {
    let mut f = setup("errors");
    let capture = Capture::default();
    let mut logger = aya_log::EbpfLogger::init_with_logger(&mut f.ebpf, capture.clone()).unwrap();
    let before = stats(&f);
    let frame = v4(quic_short(&server_cid(0, SID[2], 1), 30)).build();
    let out = f.run(PROG, &frame).unwrap();
    assert_eq!(out.action, XDP_DROP);
    let after = stats(&f);
    assert_eq!(before.delta(&after, Stat::RedirectError), 1);
    // The program says why through aya-log (which the daemon forwards to tracing).
    logger.flush();
    let lines = capture.0.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("WARN") && l.contains("worker 2 names tx port 9")),
        "no redirect warning logged: {lines:?}"
    );

    // No healthy worker: an empty Maglev table drops hashed traffic.
    f.set_maglev(&vec![NO_WORKER; MAGLEV_SIZE as usize])
        .unwrap();
    let initial = v4(quic_long(
        LongType::Initial,
        QUIC_V1,
        &[1; 8],
        &[2; 8],
        1200,
    ))
    .build();
    assert_eq!(f.run(PROG, &initial).unwrap().action, XDP_DROP);
    assert_eq!(after.delta(&stats(&f), Stat::NoWorker), 1);
}

#[test]
fn unconfigured_program_passes_everything() {
    let mut f = setup("not-ready");
    f.set_config(LbConfig::default()).unwrap();
    let frame = v4(quic_short(&server_cid(0, SID[0], 1), 30)).build();
    let out = f.run(PROG, &frame).unwrap();
    assert_eq!((out.action, &out.frame), (XDP_PASS, &frame));
}

#[test]
fn reference_and_pass_programs_behave() {
    let f = setup("others");
    let frame = v4(quic_short(&server_cid(0, SID[0], 1), 30)).build();
    assert_eq!(
        f.run("baton_xdp_reference", &frame).unwrap().action,
        XDP_DROP
    );
    assert_eq!(f.run("baton_xdp_pass", &frame).unwrap().action, XDP_PASS);
    // The benchmark floor forwards to worker 0 (devmap slot 0) without routing.
    let out = f.run("baton_xdp_forward_floor", &frame).unwrap();
    assert_eq!((out.action, &out.frame[..6]), (XDP_REDIRECT, &MACS[0][..]));
    let info = f.program(PROG).unwrap().info().unwrap();
    eprintln!(
        "baton_xdp: {:?} instructions verified, {:?} bytes translated, {} bytes JITed",
        info.verified_instruction_count(),
        info.size_translated(),
        info.size_jitted()
    );
    // The verifier gives up at 1M processed instructions. ~123k here (~102k without the
    // encapsulation); a change that keeps parse results alive across the routing multiplies it
    // (see `baton_encapsulate`): fail well before the limit, while it is still clear what grew.
    if let Some(n) = info.verified_instruction_count() {
        assert!(
            n < 400_000,
            "baton_xdp: {n} instructions verified, 1M is the limit"
        );
    }
}

#[test]
fn maps_are_pinned_by_name_in_the_fixture_directory() {
    let f = setup("pins");
    use lb_common::map_names::*;
    for name in [
        CONFIG,
        VIPS,
        CID_OVERRIDE,
        SERVER_IDS,
        WORKERS,
        MAGLEV,
        TX_PORTS,
        STATS,
        FASTPATH,
        VIP_TABLE,
        SERVER_ID_TABLE,
    ] {
        assert!(
            f.pin_dir().join(name).exists(),
            "{name} is not pinned in {}",
            f.pin_dir().display()
        );
    }
    // The maps carry BTF for keys and values, so bpftool prints fields, not hex.
    let dump = |name: &str| {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(f.pin_dir().join(name))
            .output()
            .expect(
                "bpftool is needed for this test (apt-get install bpftool; .ci/run installs it)",
            );
        assert!(
            out.status.success(),
            "bpftool failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let workers = dump(WORKERS);
    assert!(
        workers.contains("\"formatted\"")
            && workers.contains("\"tx_port\"")
            && workers.contains("\"server_id\""),
        "{workers}"
    );
    let server_ids = dump(SERVER_IDS);
    assert!(
        server_ids.contains("\"server_id\":257") && server_ids.contains("\"worker\":0"),
        "{server_ids}"
    );
}

#[test]
fn a_second_load_re_adopts_the_pinned_maps() {
    // What a restarted baton-lb does: load the object again with the same pin directory and get
    // the live maps (contents included) instead of fresh, empty ones.
    let f = setup("readopt");
    let mut again = aya::EbpfLoader::new()
        .default_map_pin_directory(f.pin_dir())
        .load(lb_user::object::bytes())
        .unwrap();
    let cfg: aya::maps::Array<_, LbConfig> =
        aya::maps::Array::try_from(again.map(lb_common::map_names::CONFIG).unwrap()).unwrap();
    assert_eq!(cfg.get(&0, 0).unwrap().maglev_size, MAGLEV_SIZE);
    let prog: &mut aya::programs::Xdp = again.program_mut(PROG).unwrap().try_into().unwrap();
    prog.load().unwrap();
    let before = stats(&f);
    let frame = v4(quic_short(&server_cid(0, SID[0], 1), 30)).build();
    let out =
        lb_user::testrun::run_xdp(std::os::fd::AsFd::as_fd(prog.fd().unwrap()), &frame, 1).unwrap();
    assert_eq!(out.action, XDP_REDIRECT);
    // The new program counted into the first load's (shared) counters.
    assert_eq!(before.delta(&stats(&f), Stat::RoutedServerId), 1);
}

#[test]
fn packets_too_short_for_the_word_loads_route_the_same() {
    // Under 24 bytes from the byte before the DCID the program copies the DCID byte by byte;
    // the route must not change.
    let mut f = setup("short-packets");
    for w in 0..2 {
        let cid = server_cid(0, SID[w], 3);
        assert_forwarded(&f, &v4(quic_short(&cid, 4)).build(), w);
        assert_forwarded(&f, &v6(quic_short(&cid, 1)).build(), w);
    }
    let unknown = server_cid(0, 0x7171, 3);
    assert_forwarded(
        &f,
        &v4(quic_short(&unknown, 4)).build(),
        hashed_worker(&unknown),
    );
    f.set_override(&unknown, 1).unwrap();
    assert_forwarded(&f, &v4(quic_short(&unknown, 4)).build(), 1);
    let dcid = [0xab; 9];
    assert_forwarded(
        &f,
        &v4(quic_long(LongType::Initial, QUIC_V1, &dcid, &[], 17)).build(),
        hashed_worker(&dcid),
    );
}

// ---- Fast path: the derived array maps (lb_common::fastpath, lb_user::fastpath) ----

use lb_common::fastpath::{
    FP_OVERRIDE_COUNTS, FP_SERVER_ID_TABLE, FP_VIP_TABLE, ServerIdSlot, VIP_TABLE_SLOTS,
};

fn base_config() -> LbConfig {
    LbConfig {
        cid_len: 8,
        server_id_len: 2,
        ready: 1,
        _pad: 0,
        maglev_size: MAGLEV_SIZE,
    }
}

fn vip4(addr: Ipv4Addr, port: u16) -> VipKey {
    let mut k = VipKey {
        port,
        family: AF_INET,
        ..Default::default()
    };
    k.addr[..4].copy_from_slice(&addr.octets());
    k
}

fn vip6(addr: Ipv6Addr, port: u16) -> VipKey {
    VipKey {
        addr: addr.octets(),
        port,
        family: AF_INET6,
        _pad: 0,
    }
}

/// A short-header datagram for server ID `SID[0]` to `addr:port`.
fn short_to(addr: IpAddr, port: u16) -> Vec<u8> {
    let client = if addr.is_ipv4() {
        IpAddr::V4(CLIENT4)
    } else {
        IpAddr::V6(CLIENT6)
    };
    Datagram::udp(
        client,
        addr,
        port,
        quic_short(&server_cid(0, SID[0], 6), 30),
    )
    .build()
}

fn unroutable_cid(nonce: u8) -> [u8; 8] {
    let mut c = server_cid(0, SID[0], nonce);
    c[0] |= 0b111 << 5;
    c
}

/// Verdict, output frame and counter deltas of one run.
fn outcome(f: &XdpFixture, frame: &[u8]) -> (u32, Vec<u8>, Vec<u64>) {
    let before = stats(f);
    let out = f.run(PROG, frame).unwrap();
    let after = stats(f);
    (
        out.action,
        out.frame,
        Stat::ALL.iter().map(|s| before.delta(&after, *s)).collect(),
    )
}

#[test]
fn fast_path_and_hash_maps_decide_every_frame_alike() {
    // The derived maps only mirror the authoritative ones, so every decision (what `baton route`
    // explains from the authoritative maps) is the same with and without them.
    let mut f = setup("fp-equivalence");
    let st = f
        .fastpath()
        .expect("the object has the fast-path maps")
        .state();
    assert_eq!(
        st.flags,
        FP_VIP_TABLE | FP_SERVER_ID_TABLE | FP_OVERRIDE_COUNTS
    );
    assert_eq!((st.cid_len, st.server_id_len), (8, 2));
    f.set_override(&server_cid(0, SID[0], 9), 1).unwrap();
    f.set_override(&unroutable_cid(4), 1).unwrap();
    f.set_override(&[0x55; 12], 0).unwrap(); // a 12-byte client DCID, as a Handshake could carry
    let mut frames = Vec::new();
    for cid in [
        server_cid(0, SID[0], 9),
        server_cid(0, SID[0], 10),
        server_cid(3, SID[1], 1),
        server_cid(0, SID[2], 1),
        server_cid(0, 0x7777, 1),
        server_cid(0, 0, 1),
        server_cid(0, 0xffff, 1),
        unroutable_cid(4),
        unroutable_cid(5),
    ] {
        frames.push(v4(quic_short(&cid, 30)).build());
        frames.push(v6(quic_short(&cid, 30)).build());
        frames.push(v4(quic_long(LongType::Handshake, QUIC_V1, &cid, &[1; 8], 300)).build());
        frames.push(v4(quic_long(LongType::Initial, QUIC_V1, &cid, &[1; 8], 1200)).build());
        frames.push(v4(quic_short(&cid, 2)).build()); // byte-by-byte DCID copy
    }
    frames.push(
        v4(quic_long(
            LongType::Handshake,
            QUIC_V2,
            &[0x55; 12],
            &[1; 8],
            300,
        ))
        .build(),
    );
    frames.push(
        v6(quic_long(
            LongType::Initial,
            QUIC_V1,
            &[0x42; 17],
            &[1; 8],
            1200,
        ))
        .build(),
    );
    frames.push(short_to(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 101)), PORT));
    frames.push(short_to(IpAddr::V4(VIP4), 444));
    frames.push(short_to(IpAddr::V6(VIP6), 8443));
    for (_, chain) in ipv6_chains() {
        frames.push(v6_ext(quic_short(&server_cid(0, SID[1], 2), 30), &chain).build());
    }
    frames.push(
        v6_ext(
            quic_short(&server_cid(0, SID[1], 2), 30),
            &[fragment_header(0, true)],
        )
        .build(),
    );
    for (_, d) in ipv6_portless(&quic_short(&server_cid(0, SID[1], 2), 30)) {
        frames.push(d.build());
    }
    let full = v4(quic_short(&server_cid(0, SID[0], 1), 4)).build();
    for len in [14, 30, 37, 42, 45, full.len()] {
        frames.push(full[..len].to_vec());
    }

    let fast: Vec<_> = frames.iter().map(|fr| outcome(&f, fr)).collect();
    f.disable_fastpath();
    let slow: Vec<_> = frames.iter().map(|fr| outcome(&f, fr)).collect();
    f.enable_fastpath().unwrap();
    let again: Vec<_> = frames.iter().map(|fr| outcome(&f, fr)).collect();
    for (i, frame) in frames.iter().enumerate() {
        assert_eq!(
            fast[i],
            slow[i],
            "frame {i} ({} bytes) decided differently with the fast path",
            frame.len()
        );
        assert_eq!(
            again[i], slow[i],
            "frame {i} after re-enabling the fast path"
        );
    }
    // Both paths were exercised: overrides, server IDs and hashing.
    let sum = |s: Stat| fast.iter().map(|o| o.2[s as usize]).sum::<u64>();
    assert!(
        sum(Stat::RoutedOverride) >= 4
            && sum(Stat::RoutedServerId) >= 8
            && sum(Stat::RoutedHash) >= 8
    );
}

#[test]
fn server_id_table_hit_miss_and_updates() {
    let mut f = setup("fp-sid-table");
    let fp = f.fastpath().unwrap();
    for w in 0..3 {
        assert_eq!(
            fp.server_id_slot(SID[w] as u32),
            Some(ServerIdSlot {
                worker: w as u32,
                overrides: 0
            })
        );
    }
    assert_eq!(fp.server_id_slot(0x7777).unwrap().worker, NO_WORKER);

    // Hit.
    let before = stats(&f);
    assert_forwarded(
        &f,
        &v4(quic_short(&server_cid(0, SID[1], 2), 30)).build(),
        1,
    );
    assert_eq!(before.delta(&stats(&f), Stat::RoutedServerId), 1);
    // Miss (NO_WORKER): Maglev.
    let unknown = server_cid(0, 0x7777, 2);
    let frame = v4(quic_short(&unknown, 30)).build();
    let before = stats(&f);
    assert_forwarded(&f, &frame, hashed_worker(&unknown));
    assert_eq!(before.delta(&stats(&f), Stat::RoutedHash), 1);
    // A new server ID routes at once; removing it hashes its CIDs again.
    f.set_server_id(0x7777, 1).unwrap();
    assert_forwarded(&f, &frame, 1);
    f.remove_server_id(0x7777).unwrap();
    assert_eq!(
        f.fastpath().unwrap().server_id_slot(0x7777).unwrap().worker,
        NO_WORKER
    );
    assert_forwarded(&f, &frame, hashed_worker(&unknown));
    // The table's edges: server IDs 0 and 0xffff.
    for sid in [0u64, 0xffff] {
        f.set_server_id(sid, 1).unwrap();
        assert_forwarded(&f, &v4(quic_short(&server_cid(0, sid, 3), 30)).build(), 1);
    }
    // A worker slot that is not in use falls through to hashing, as with the hash map.
    let mut entry = WorkerEntry {
        mac: MACS[1],
        flags: 0,
        tx_port: TX_SAME_IFACE,
        _pad: 0,
        server_id: SID[1],
    };
    f.set_worker(1, entry).unwrap();
    // (A CID whose Maglev slot names worker 0: worker 1 is out of use.)
    let cid = (0..=255u8)
        .map(|n| server_cid(0, SID[1], n))
        .find(|c| hashed_worker(c) == 0)
        .unwrap();
    assert_forwarded(&f, &v4(quic_short(&cid, 30)).build(), 0);
    entry.flags = WORKER_IN_USE | WORKER_HEALTHY;
    f.set_worker(1, entry).unwrap();
    assert_forwarded(&f, &v4(quic_short(&cid, 30)).build(), 1);
}

#[test]
fn server_ids_longer_than_two_bytes_use_the_hash_map() {
    let mut f = setup("fp-long-sid");
    let layout = CidLayout::new(9, 3).unwrap();
    f.set_config(LbConfig {
        cid_len: 9,
        server_id_len: 3,
        ..base_config()
    })
    .unwrap();
    let st = f.fastpath().unwrap().state();
    assert_eq!(
        st.flags & FP_SERVER_ID_TABLE,
        0,
        "no array table for 3-byte server IDs"
    );
    assert_ne!(st.flags & FP_OVERRIDE_COUNTS, 0);
    f.set_server_id(0x01_0203, 1).unwrap();
    let cid = |sid: u64, nonce: u8| {
        let mut c = [0u8; 9];
        layout.encode(0, sid, &[nonce, 1, 2, 3, 4], &mut c).unwrap();
        c
    };
    assert_forwarded(&f, &v4(quic_short(&cid(0x01_0203, 1), 30)).build(), 1);
    assert_forwarded(&f, &v4(quic_short(&cid(SID[0], 1), 30)).build(), 0);
    let unknown = cid(0x77_7777, 1);
    assert_forwarded(
        &f,
        &v4(quic_short(&unknown, 30)).build(),
        hashed_worker(&unknown),
    );
    // With no table bucket, every override counts in `other_overrides`.
    f.set_override(&cid(0x01_0203, 5), 0).unwrap();
    assert_eq!(f.fastpath().unwrap().state().other_overrides, 1);
    assert_forwarded(&f, &v4(quic_short(&cid(0x01_0203, 5), 30)).build(), 0);
    f.del_override(&cid(0x01_0203, 5)).unwrap();
    assert_eq!(f.fastpath().unwrap().state().other_overrides, 0);
    assert_forwarded(&f, &v4(quic_short(&cid(0x01_0203, 5), 30)).build(), 1);
}

#[test]
fn vip_table_with_several_vips_including_ipv6() {
    let mut f = setup("fp-vips");
    let extra = [
        vip4(VIP4, 8443),
        vip4(Ipv4Addr::new(10, 0, 0, 101), PORT),
        vip6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x200), PORT),
        vip6(VIP6, 4433),
        vip4(Ipv4Addr::new(172, 16, 9, 1), 4433),
    ];
    for k in extra {
        f.add_vip(k).unwrap();
    }
    let addr_of = |k: &VipKey| -> IpAddr {
        if k.family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(k.addr))
        }
    };
    let table = f.fastpath().unwrap().vip_table().unwrap();
    assert_eq!(table.count, 7);
    assert_ne!(f.fastpath().unwrap().state().flags & FP_VIP_TABLE, 0);
    let mut all = vec![vip4(VIP4, PORT), vip6(VIP6, PORT)];
    all.extend(extra);
    for k in &all {
        assert_forwarded(&f, &short_to(addr_of(k), k.port), 0);
    }
    let strangers = [
        (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 102)), PORT),
        (IpAddr::V4(VIP4), 4433),
        (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 101)), 8443),
        (
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x201)),
            PORT,
        ),
        (
            IpAddr::V6(Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 0x100)),
            PORT,
        ), // same low 64 bits
        (IpAddr::V6(VIP6), 8443),
    ];
    let assert_passes = |f: &XdpFixture, addr: IpAddr, port: u16| {
        let frame = short_to(addr, port);
        let out = f.run(PROG, &frame).unwrap();
        assert_eq!(
            (out.action, &out.frame),
            (XDP_PASS, &frame),
            "{addr}:{port} is not a VIP"
        );
    };
    for (addr, port) in strangers {
        assert_passes(&f, addr, port);
    }

    // Removing a VIP from the middle: it passes, every other VIP keeps its slot and routes.
    let gone = all.remove(3);
    f.del_vip(&gone).unwrap();
    let after = f.fastpath().unwrap().vip_table().unwrap();
    for (i, slot) in table.slots.iter().enumerate() {
        if slot.key == gone {
            assert_eq!(after.slots[i].flags, 0, "the removed VIP's slot is freed");
        } else {
            assert_eq!(after.slots[i], *slot, "slot {i} kept its VIP");
        }
    }
    assert_passes(&f, addr_of(&gone), gone.port);
    for k in &all {
        assert_forwarded(&f, &short_to(addr_of(k), k.port), 0);
    }

    // More VIPs than the table holds: the program falls back to BATON_VIPS, still exact.
    let many: Vec<VipKey> = (0..VIP_TABLE_SLOTS as u8)
        .map(|i| vip4(Ipv4Addr::new(10, 0, 1, i), PORT))
        .collect();
    for k in &many {
        f.add_vip(*k).unwrap();
    }
    assert_eq!(f.fastpath().unwrap().state().flags & FP_VIP_TABLE, 0);
    for k in all.iter().chain(&many) {
        assert_forwarded(&f, &short_to(addr_of(k), k.port), 0);
    }
    assert_passes(&f, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 200)), PORT);
    // Back under the limit: the table is used again.
    for k in &many {
        f.del_vip(k).unwrap();
    }
    assert_ne!(f.fastpath().unwrap().state().flags & FP_VIP_TABLE, 0);
    for k in &all {
        assert_forwarded(&f, &short_to(addr_of(k), k.port), 0);
    }
    assert_passes(&f, IpAddr::V4(Ipv4Addr::new(10, 0, 1, 3)), PORT);
}

#[test]
fn override_lookup_is_skipped_only_when_no_override_can_match() {
    let mut f = setup("fp-overrides");
    let slot = |f: &XdpFixture, sid: u64| {
        f.fastpath()
            .unwrap()
            .server_id_slot(sid as u32)
            .unwrap()
            .overrides
    };
    let cid = server_cid(0, SID[0], 9);
    let frame = v4(quic_short(&cid, 30)).build();
    // Empty bucket: no override lookup, routed by server ID.
    assert_eq!(
        (
            slot(&f, SID[0]),
            f.fastpath().unwrap().state().other_overrides
        ),
        (0, 0)
    );
    let before = stats(&f);
    assert_forwarded(&f, &frame, 0);
    assert_eq!(before.delta(&stats(&f), Stat::RoutedServerId), 1);
    // One override in the bucket: looked up and hit.
    f.set_override(&cid, 1).unwrap();
    assert_eq!(slot(&f, SID[0]), 1);
    let before = stats(&f);
    assert_forwarded(&f, &frame, 1);
    assert_eq!(before.delta(&stats(&f), Stat::RoutedOverride), 1);
    // A second CID of the same server ID; replacing an override does not count it twice.
    let cid2 = server_cid(0, SID[0], 10);
    f.set_override(&cid2, 1).unwrap();
    f.set_override(&cid2, 0).unwrap();
    f.set_override(&cid, 1).unwrap();
    assert_eq!(slot(&f, SID[0]), 2);
    assert_eq!(slot(&f, SID[1]), 0, "other server IDs' buckets stay empty");
    // A non-empty bucket whose CID has no override: looked up, missed, routed by server ID.
    assert_forwarded(
        &f,
        &v4(quic_short(&server_cid(0, SID[0], 11), 30)).build(),
        0,
    );
    f.del_override(&cid2).unwrap();
    assert!(
        f.del_override(&cid2).is_err(),
        "deleting twice finds nothing and counts nothing"
    );
    assert_eq!(slot(&f, SID[0]), 1);
    f.del_override(&cid).unwrap();
    assert_eq!(slot(&f, SID[0]), 0);
    assert_forwarded(&f, &frame, 0);

    // CIDs without a server-ID bucket (unroutable) count in `other_overrides`.
    let unroutable = unroutable_cid(4);
    let uframe = v4(quic_short(&unroutable, 30)).build();
    assert_forwarded(&f, &uframe, hashed_worker(&unroutable));
    f.set_override(&unroutable, 1 - hashed_worker(&unroutable) as u32)
        .unwrap();
    assert_eq!(f.fastpath().unwrap().state().other_overrides, 1);
    assert_forwarded(&f, &uframe, 1 - hashed_worker(&unroutable));
    f.del_override(&unroutable).unwrap();
    assert_eq!(f.fastpath().unwrap().state().other_overrides, 0);
    assert_forwarded(&f, &uframe, hashed_worker(&unroutable));

    // Why every writer must count: an override inserted behind the counts is skipped (its
    // bucket says empty) until the maps are rebuilt, which recounts.
    f.set_override_uncounted(&cid, 1).unwrap();
    assert_forwarded(&f, &frame, 0);
    f.rebuild_fastpath().unwrap();
    assert_eq!(slot(&f, SID[0]), 1);
    assert_forwarded(&f, &frame, 1);
}

#[test]
fn config_changes_without_a_rebuild_fall_back_to_exact_paths() {
    let mut f = setup("fp-stale");
    // A new Maglev size without `set_maglev_size`: the stale reciprocal fails validation and
    // the program divides: the slot is still cid_hash % size.
    let size = 241;
    f.set_config_only(LbConfig {
        maglev_size: size,
        ..base_config()
    })
    .unwrap();
    let table = maglev_table();
    for i in 0u8..24 {
        let dcid = [i, 0x9e, i ^ 0x5a, 7, 1, 2, 3, 4, i];
        let want = table[(cid_hash(&CidKey::new(&dcid).unwrap()) % size) as usize] as usize;
        assert_forwarded(
            &f,
            &v4(quic_long(LongType::Initial, QUIC_V1, &dcid, &[1; 8], 1200)).build(),
            want,
        );
    }
    f.fastpath().unwrap().set_maglev_size(size);
    assert_eq!(
        f.fastpath().unwrap().state().maglev_reciprocal,
        lb_common::fastpath::maglev_reciprocal(size)
    );
    for i in 0u8..24 {
        let dcid = [i, 0x9e, i ^ 0x5a, 7, 1, 2, 3, 4, i];
        let want = table[(cid_hash(&CidKey::new(&dcid).unwrap()) % size) as usize] as usize;
        assert_forwarded(
            &f,
            &v4(quic_long(LongType::Initial, QUIC_V1, &dcid, &[1; 8], 1200)).build(),
            want,
        );
    }

    // A new CID layout without a rebuild: the override counts (bucketed for the old layout)
    // and the server-ID table are ignored, so an override is still found.
    f.set_config(base_config()).unwrap();
    let cid = server_cid(0, SID[0], 9);
    f.set_override(&cid, 1).unwrap();
    f.set_config_only(LbConfig {
        server_id_len: 1,
        ..base_config()
    })
    .unwrap();
    f.set_server_id(0x01, 0).unwrap(); // under the 1-byte layout, `cid` carries server ID 0x01
    assert_forwarded(&f, &v4(quic_short(&cid, 30)).build(), 1);
    f.del_override(&cid).unwrap();
    assert_forwarded(&f, &v4(quic_short(&cid, 30)).build(), 0);
    // After the rebuild the 1-byte layout gets its table.
    f.rebuild_fastpath().unwrap();
    let st = f.fastpath().unwrap().state();
    assert_eq!(
        (st.server_id_len, st.flags & FP_SERVER_ID_TABLE),
        (1, FP_SERVER_ID_TABLE)
    );
    assert_forwarded(&f, &v4(quic_short(&cid, 30)).build(), 0);
}

// ---- `baton route` (lb_user::simulate): the program's own answer on the fixture's maps ----
//
// The fixture's pin directory stands in for the daemon's: `route` loads its own instance of the
// object on these maps, with private counters, and must say exactly what `baton_xdp` does.

use lb_user::simulate::{
    Attached, RouteAnswer, RouteQuery, RouteReport, Simulator, action_name, route, route_frame,
};

fn ask_route(f: &XdpFixture, cid: &[u8], initial: bool) -> RouteReport {
    let q = RouteQuery {
        cid: cid.to_vec(),
        initial,
        vip: None,
    };
    route(lb_user::object::bytes(), f.pin_dir(), &q).unwrap()
}

/// Asks `baton route`, checks the fixture's (live) counters did not move, then runs the
/// fixture's own program on the same frame and checks the answer says what it did.
fn check_route(f: &XdpFixture, cid: &[u8], initial: bool) -> RouteAnswer {
    let before = stats(f);
    let rep = ask_route(f, cid, initial);
    assert_eq!(
        stats(f).0,
        before.0,
        "a route query must not move the live counters"
    );
    // The default VIP is the first enabled one in (family, address, port) order: IPv4.
    let frame = route_frame(
        cid,
        rep.answer.packet == "initial",
        std::net::SocketAddr::new(IpAddr::V4(VIP4), PORT),
    );
    let out = f.run(PROG, &frame).unwrap();
    let after = stats(f);
    let moved: Vec<Stat> = Stat::ALL
        .iter()
        .copied()
        .filter(|s| before.delta(&after, *s) > 0)
        .collect();
    let a = rep.answer.clone();
    assert_eq!(rep.verdict.action, out.action, "{a:?}");
    assert_eq!(a.action, action_name(out.action), "{a:?}");
    let counted: Vec<Stat> = rep.verdict.counted.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        counted, moved,
        "private counters move as the live ones: {a:?}"
    );
    let reasons = [
        (Stat::RoutedOverride, "override"),
        (Stat::RoutedServerId, "server_id"),
        (Stat::RoutedHash, "hash"),
        (Stat::NoWorker, "no_worker"),
        (Stat::Malformed, "malformed"),
        (Stat::Passed, "pass"),
    ];
    let (stat, want) = reasons
        .into_iter()
        .find(|(s, _)| moved.contains(s))
        .expect("the program counted a verdict");
    assert_eq!(a.reason, want, "{a:?}");
    let routed = matches!(
        stat,
        Stat::RoutedOverride | Stat::RoutedServerId | Stat::RoutedHash
    );
    let want_worker = routed.then(|| worker_of(&out) as u32);
    assert_eq!(a.worker_index, want_worker, "{a:?}");
    if let Some(w) = want_worker {
        assert_eq!(a.mac, Some(lb_user::config::format_mac(&MACS[w as usize])));
        assert_eq!(a.server_id, Some(SID[w as usize]), "{a:?}");
    }
    assert_eq!(a.cid, lb_user::controller::hex(cid));
    a
}

#[test]
fn route_answers_what_the_program_does() {
    let mut f = setup("route-answers");
    // Server ID in the CID.
    let a = check_route(&f, &server_cid(0, SID[1], 1), false);
    assert_eq!((a.reason.as_str(), a.worker_index), ("server_id", Some(1)));
    assert_eq!((a.action.as_str(), a.packet.as_str()), ("tx", "short"));
    // An override wins over the server ID; removing it restores the route.
    let moved = server_cid(0, SID[1], 2);
    f.set_override(&moved, 0).unwrap();
    let a = check_route(&f, &moved, false);
    assert_eq!((a.reason.as_str(), a.worker_index), ("override", Some(0)));
    assert_eq!(a.action, "redirect");
    f.del_override(&moved).unwrap();
    assert_eq!(check_route(&f, &moved, false).reason, "server_id");
    // A server ID no worker has, and an unroutable CID: Maglev.
    let a = check_route(&f, &server_cid(0, 0x0777, 3), false);
    assert_eq!(a.reason, "hash");
    assert!(a.detail.contains("belongs to no worker"), "{a:?}");
    let a = check_route(&f, &unroutable_cid(4), false);
    assert_eq!(a.reason, "hash");
    assert!(a.detail.contains("unroutable"), "{a:?}");
    // A DCID of another length can only be an Initial's; --initial asks about one anyway.
    let a = check_route(&f, &[0x42; 12], false);
    assert_eq!((a.reason.as_str(), a.packet.as_str()), ("hash", "initial"));
    let a = check_route(&f, &server_cid(0, SID[0], 5), true);
    assert_eq!(a.packet, "initial");
    // The worker behind an empty devmap slot: chosen, then dropped.
    let a = check_route(&f, &server_cid(0, SID[2], 6), false);
    assert_eq!((a.reason.as_str(), a.worker_index), ("server_id", Some(2)));
    assert_eq!(a.action, "drop");
    assert!(a.detail.contains("redirect_error"), "{a:?}");
    // Without the fast-path mirrors the program (and so the answer) decides the same.
    f.disable_fastpath();
    let a = check_route(&f, &server_cid(0, SID[1], 7), false);
    assert_eq!((a.reason.as_str(), a.worker_index), ("server_id", Some(1)));
}

#[test]
fn route_answers_for_no_worker_and_unconfigured_tables() {
    let mut f = setup("route-empty");
    // No healthy worker: the Maglev table is empty.
    f.set_config(LbConfig {
        maglev_size: 0,
        ..base_config()
    })
    .unwrap();
    let a = check_route(&f, &unroutable_cid(1), false);
    assert_eq!(
        (a.reason.as_str(), a.action.as_str()),
        ("no_worker", "drop")
    );
    assert!(a.detail.contains("Maglev table empty"), "{a:?}");
    // Tables not ready: everything passes.
    f.set_config(LbConfig {
        ready: 0,
        ..base_config()
    })
    .unwrap();
    let a = check_route(&f, &server_cid(0, SID[0], 2), false);
    assert_eq!((a.reason.as_str(), a.action.as_str()), ("pass", "pass"));
}

#[test]
fn route_tells_workers_sharing_a_mac_apart() {
    let mut f = setup("route-shared-mac");
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
        let before = stats(&f);
        let a = ask_route(&f, &server_cid(0, sid, 1), false).answer;
        assert_eq!(stats(&f).0, before.0);
        assert_eq!(
            (a.reason.as_str(), a.worker_index),
            ("server_id", Some(want))
        );
        assert_eq!(a.server_id, Some(sid));
    }
}

#[test]
fn route_shares_every_map_but_the_counters_and_leaves_no_pins() {
    let f = setup("route-pins");
    let list = |d: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let pins = list(f.pin_dir());
    let sim = Simulator::load(lb_user::object::bytes(), f.pin_dir()).unwrap();
    assert_eq!(
        sim.private_maps(),
        [lb_common::map_names::STATS.to_string()]
    );
    assert!(sim.notes().is_empty(), "{:?}", sim.notes());
    assert_eq!(sim.attached().unwrap(), Attached::Nothing);
    // Same build, other maps (a private BATON_STATS): the same tag, which is what tells an
    // attached program of another build apart.
    let tag = f.program(PROG).unwrap().info().unwrap().tag();
    assert_eq!(sim.program_tag().unwrap(), tag);
    let private = sim.private_dir().to_path_buf();
    // The loader saw only the private directory: the live maps re-pinned there (the same kernel
    // maps), the counters a new one.
    let id = |p: std::path::PathBuf| aya::maps::MapInfo::from_pin(p).unwrap().id();
    let maps: Vec<String> = pins
        .iter()
        .filter(|n| n.starts_with("BATON_"))
        .cloned()
        .collect();
    assert_eq!(list(&private), maps);
    for name in &maps {
        let same = id(private.join(name)) == id(f.pin_dir().join(name));
        assert_eq!(same, name != lb_common::map_names::STATS, "{name}");
    }
    drop(sim);
    assert!(!private.exists(), "the private pins go with the simulator");
    let rep = ask_route(&f, &server_cid(0, SID[0], 1), false);
    assert!(
        rep.notes
            .iter()
            .any(|n| n.contains("no program is attached")),
        "{:?}",
        rep.notes
    );
    assert_eq!(
        list(f.pin_dir()),
        pins,
        "nothing pinned in the live directory"
    );
}

// ---- Encapsulation (BATON_WORKER_ENCAP) ----
//
// Every outer header field is checked against the RFCs byte by byte here, with a checksum
// computed straight from the output bytes (not with lb-common's helpers), and the inner datagram
// must come out byte-identical.

use lb_common::encap::{
    ENCAP_GUE, ENCAP_IPIP, ENCAP_NONE, EncapEntry, GUE_SPORT_MASK, flow_hash, gue_source_port,
};

const LB4: [u8; 4] = [198, 51, 100, 1];
const WORKER4: [u8; 4] = [203, 0, 113, 20];
const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
const WORKER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xee, 0, 0, 0, 0, 0x20);
const GUE_PORT: u16 = 6080;
const SPORT_BASE: u16 = 0xc000;

fn encap(mode: u8, family: u8, mtu: u16) -> EncapEntry {
    let mut e = EncapEntry {
        mode,
        family,
        mtu,
        ..Default::default()
    };
    if mode == ENCAP_GUE {
        e.gue_port = GUE_PORT;
        e.gue_sport_base = SPORT_BASE;
    }
    if family == AF_INET {
        e.src[..4].copy_from_slice(&LB4);
        e.dst[..4].copy_from_slice(&WORKER4);
    } else {
        e.src = LB6.octets();
        e.dst = WORKER6.octets();
    }
    e
}

/// RFC 1071 over `bytes`, big-endian 16-bit words, odd byte padded: 0 over a correct header or
/// segment with its pseudo-header.
fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum = 0u64;
    for c in bytes.chunks(2) {
        sum += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The pseudo-header of a UDP segment (RFC 768 / RFC 8200 §8.1) of `len` bytes.
fn pseudo(src: &[u8], dst: &[u8], len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(src);
    p.extend_from_slice(dst);
    if src.len() == 4 {
        p.extend_from_slice(&[0, 17]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 17]);
    }
    p
}

/// `d` built with a correct UDP checksum (what a client's stack sends; the LB's GUE-over-IPv6
/// checksum relies on it).
fn build_checksummed(d: &Datagram) -> Vec<u8> {
    let mut f = d.build();
    let (_, l4, _) = d.offsets();
    let (src, dst): (Vec<u8>, Vec<u8>) = match (d.src, d.dst) {
        (IpAddr::V4(s), IpAddr::V4(t)) => (s.octets().to_vec(), t.octets().to_vec()),
        (IpAddr::V6(s), IpAddr::V6(t)) => (s.octets().to_vec(), t.octets().to_vec()),
        _ => unreachable!(),
    };
    let seg_len = f.len() - l4;
    let mut sum_in = pseudo(&src, &dst, seg_len);
    sum_in.extend_from_slice(&f[l4..]);
    let c = match ones_sum(&sum_in) {
        0 => 0xffff,
        c => c,
    };
    f[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    f
}

fn inner_v4(len: usize) -> Datagram {
    v4(quic_short(&server_cid(0, SID[0], 1), len))
}

fn inner_v6(len: usize) -> Datagram {
    v6(quic_short(&server_cid(0, SID[0], 1), len))
}

/// Runs `frame` to worker 0 (redirected) with `entry` in its slot and checks the Ethernet
/// header, every outer header field and the inner datagram; returns the output frame.
fn assert_encapsulated(f: &mut XdpFixture, entry: EncapEntry, frame: &[u8]) -> Vec<u8> {
    f.set_worker_encap(0, entry).unwrap();
    let before = stats(f);
    let out = f.run(PROG, frame).unwrap();
    assert_eq!(out.action, XDP_REDIRECT, "verdict");
    let o = &out.frame;
    let inner_v6 = frame[12..14] == [0x86, 0xdd];
    let inner_proto = if inner_v6 { 41 } else { 4 };
    // The inner datagram's own length (any Ethernet padding after it is not carried).
    let inner_len = if inner_v6 {
        40 + u16::from_be_bytes([frame[18], frame[19]]) as usize
    } else {
        u16::from_be_bytes([frame[16], frame[17]]) as usize
    };
    let inner = &frame[14..14 + inner_len];

    assert_eq!(
        &o[..6],
        &MACS[0],
        "destination MAC = the next hop's (worker entry)"
    );
    assert_eq!(&o[6..12], &LB_MAC, "source MAC = ours");
    let gue = entry.mode == ENCAP_GUE;
    let (ip_len, l4_proto) = if entry.family == AF_INET {
        assert_eq!(&o[12..14], &[0x08, 0x00], "ethertype IPv4");
        let h = &o[14..34];
        assert_eq!(h[0], 0x45, "version 4, IHL 5");
        assert_eq!(h[1], 0, "DSCP/ECN");
        assert_eq!(
            u16::from_be_bytes([h[2], h[3]]) as usize,
            o.len() - 14,
            "total length"
        );
        assert_eq!(&h[4..6], &[0, 0], "identification");
        assert_eq!(&h[6..8], &[0x40, 0], "DF set, offset 0");
        assert_eq!(h[8], 64, "TTL");
        assert_eq!(&h[12..16], &LB4, "outer source");
        assert_eq!(&h[16..20], &WORKER4, "outer destination");
        assert_eq!(ones_sum(h), 0, "IPv4 header checksum {:02x?}", &h[10..12]);
        (20, h[9])
    } else {
        assert_eq!(&o[12..14], &[0x86, 0xdd], "ethertype IPv6");
        let h = &o[14..54];
        assert_eq!(h[0] >> 4, 6, "version 6");
        assert_eq!(
            (h[0] & 0x0f, h[1] >> 4),
            (0, 0),
            "traffic class 0 (flow label follows)"
        );
        assert_eq!(
            u16::from_be_bytes([h[4], h[5]]) as usize,
            o.len() - 54,
            "payload length"
        );
        assert_eq!(h[7], 64, "hop limit");
        assert_eq!(&h[8..24], &LB6.octets(), "outer source");
        assert_eq!(&h[24..40], &WORKER6.octets(), "outer destination");
        (40, h[6])
    };
    let outer_ip = &o[14..14 + ip_len];
    let mut at = 14 + ip_len;
    if gue {
        assert_eq!(l4_proto, 17, "outer protocol UDP");
        let u = &o[at..at + 8];
        let sport = u16::from_be_bytes([u[0], u[1]]);
        assert!(
            (SPORT_BASE..=SPORT_BASE + GUE_SPORT_MASK).contains(&sport),
            "source port {sport:#x} in the base's range"
        );
        assert_eq!(
            u16::from_be_bytes([u[2], u[3]]),
            GUE_PORT,
            "destination port"
        );
        assert_eq!(
            u16::from_be_bytes([u[4], u[5]]) as usize,
            o.len() - at,
            "UDP length"
        );
        let csum = u16::from_be_bytes([u[6], u[7]]);
        if entry.family == AF_INET {
            assert_eq!(csum, 0, "UDP checksum over IPv4: none");
        } else {
            assert_ne!(csum, 0, "UDP checksum over IPv6 is set");
            let mut all = pseudo(&outer_ip[8..24], &outer_ip[24..40], o.len() - at);
            all.extend_from_slice(&o[at..]);
            assert_eq!(ones_sum(&all), 0, "UDP checksum over IPv6 verifies");
        }
        assert_eq!(
            &o[at + 8..at + 12],
            &[0, inner_proto, 0, 0],
            "GUE: version 0, C 0, hlen 0, proto, flags 0"
        );
        at += 12;
    } else {
        assert_eq!(l4_proto, inner_proto, "IPIP protocol / next header");
    }
    assert_eq!(&o[at..], inner, "inner datagram unchanged");

    let after = stats(f);
    assert_eq!(before.delta(&after, Stat::Encapsulated), 1);
    assert_eq!(before.delta(&after, Stat::RoutedServerId), 1);
    assert_eq!(before.delta(&after, Stat::Redirected), 1);
    assert_eq!(before.delta(&after, Stat::Bytes), o.len() as u64);
    assert_eq!(before.delta(&after, Stat::EncapTooBig), 0);
    out.frame
}

#[test]
fn ipip_over_ipv4() {
    let mut f = setup("ipip4");
    let frame = inner_v4(1200).build();
    let out = assert_encapsulated(&mut f, encap(ENCAP_IPIP, AF_INET, 1500), &frame);
    assert_eq!(out.len(), frame.len() + 20);
    // IPv6 inside IPv4 (protocol 41) too: the outer family need not be the inner one.
    let frame = inner_v6(1200).build();
    let out = assert_encapsulated(&mut f, encap(ENCAP_IPIP, AF_INET, 1500), &frame);
    assert_eq!(out.len(), frame.len() + 20);
}

#[test]
fn ipip_over_ipv6() {
    let mut f = setup("ipip6");
    let frame = inner_v6(1200).build();
    let out = assert_encapsulated(&mut f, encap(ENCAP_IPIP, AF_INET6, 1500), &frame);
    assert_eq!(out.len(), frame.len() + 40);
    let frame = inner_v4(1200).build();
    assert_encapsulated(&mut f, encap(ENCAP_IPIP, AF_INET6, 1500), &frame);
}

#[test]
fn gue_over_ipv4() {
    let mut f = setup("gue4");
    let entry = encap(ENCAP_GUE, AF_INET, 1500);
    let frame = inner_v4(1200).build();
    let out = assert_encapsulated(&mut f, entry, &frame);
    assert_eq!(out.len(), frame.len() + 32);
    // The source port is the flow's hash: as lb-common computes it, and other client ports
    // give other source ports (ECMP/RSS spread).
    let client = u32::from_ne_bytes(CLIENT4.octets()) as u64;
    let ports = u32::from_ne_bytes([0x9c, 0x40, 0x01, 0xbb]); // 40000 -> 443
    let want = gue_source_port(SPORT_BASE, flow_hash([client, 0], ports));
    assert_eq!(u16::from_be_bytes([out[34], out[35]]), want);
    let mut sports = std::collections::HashSet::new();
    for p in 0..32u16 {
        let mut d = inner_v4(100);
        d.src_port = 50000 + p;
        let out = assert_encapsulated(&mut f, entry, &d.build());
        sports.insert(u16::from_be_bytes([out[34], out[35]]));
    }
    assert!(sports.len() >= 28, "source ports do not spread: {sports:?}");
    let frame = inner_v6(1200).build();
    assert_encapsulated(&mut f, entry, &frame);
}

#[test]
fn gue_over_ipv6_with_a_full_udp_checksum() {
    let mut f = setup("gue6");
    let entry = encap(ENCAP_GUE, AF_INET6, 1500);
    for len in [1200, 1201, 30, 1] {
        let frame = build_checksummed(&inner_v6(len));
        let out = assert_encapsulated(&mut f, entry, &frame);
        assert_eq!(out.len(), frame.len() + 52);
        // Mixed: IPv4 inside IPv6.
        let frame = build_checksummed(&inner_v4(len));
        assert_encapsulated(&mut f, entry, &frame);
    }
    // Flow label: from the flow hash, the same for every packet of the flow.
    let frame = build_checksummed(&inner_v6(500));
    let a = assert_encapsulated(&mut f, entry, &frame);
    let b = assert_encapsulated(&mut f, entry, &frame);
    assert_eq!(a[15..18], b[15..18]);
    assert_ne!([a[15] & 0x0f, a[16], a[17]], [0, 0, 0], "flow label set");
}

#[test]
fn gue_over_ipv6_sends_checksum_zero_where_the_inner_one_cannot_be_used() {
    // The outer checksum is derived from the inner UDP checksum; where that is impossible
    // (inner IPv4 UDP without checksum, inner IPv6 with extension headers), RFC 6935/6936's
    // zero checksum for tunnels is sent.
    let mut f = setup("gue6zero");
    f.set_worker_encap(0, encap(ENCAP_GUE, AF_INET6, 1500))
        .unwrap();
    let no_csum = inner_v4(200).build();
    let ext = v6_ext(
        quic_short(&server_cid(0, SID[0], 1), 200),
        &[ext_header(IPPROTO_HOPOPTS, 1, 0)],
    );
    for frame in [no_csum, build_checksummed(&ext)] {
        let out = f.run(PROG, &frame).unwrap();
        assert_eq!(out.action, XDP_REDIRECT);
        assert_eq!(&out.frame[54 + 6..54 + 8], &[0, 0], "UDP checksum 0");
        assert_eq!(&out.frame[66..], &frame[14..], "inner unchanged");
    }
}

#[test]
fn encapsulated_datagrams_over_the_path_mtu_are_dropped_and_counted() {
    let mut f = setup("encap-mtu");
    for (entry, overhead) in [
        (encap(ENCAP_IPIP, AF_INET, 1280), 20),
        (encap(ENCAP_GUE, AF_INET, 1280), 32),
        (encap(ENCAP_IPIP, AF_INET6, 1280), 40),
        (encap(ENCAP_GUE, AF_INET6, 1280), 52),
    ] {
        f.set_worker_encap(0, entry).unwrap();
        // Inner IPv4 of exactly MTU - overhead bytes fits; one more byte does not.
        let fits = inner_v4(1280 - overhead - 20 - 8 - 9).build();
        assert_eq!(fits.len() - 14, 1280 - overhead);
        assert_encapsulated(
            &mut f,
            entry,
            &build_checksummed(&inner_v4(1280 - overhead - 37)),
        );
        let too_big = build_checksummed(&inner_v4(1280 - overhead - 36));
        let before = stats(&f);
        let out = f.run(PROG, &too_big).unwrap();
        assert_eq!(out.action, XDP_DROP);
        assert_eq!(out.frame, too_big, "dropped untouched");
        let after = stats(&f);
        assert_eq!(before.delta(&after, Stat::EncapTooBig), 1);
        assert_eq!(before.delta(&after, Stat::Ipv4), 1);
        for s in [
            Stat::Encapsulated,
            Stat::RoutedServerId,
            Stat::Redirected,
            Stat::Bytes,
        ] {
            assert_eq!(before.delta(&after, s), 0, "{s:?}");
        }
    }
}

#[test]
fn encap_mode_0_is_layer_2_exactly_as_before() {
    let mut f = setup("encap-none");
    // A mode-0 entry with other fields set changes nothing either.
    let mut none = encap(ENCAP_GUE, AF_INET6, 1280);
    none.mode = ENCAP_NONE;
    for entry in [EncapEntry::default(), none] {
        f.set_worker_encap_unchecked(0, entry).unwrap();
        f.set_worker_encap_unchecked(1, entry).unwrap();
        for frame in [inner_v4(1400).build(), inner_v6(1400).build()] {
            let before = stats(&f);
            assert_forwarded(&f, &frame, 0);
            let after = stats(&f);
            assert_eq!(before.delta(&after, Stat::Encapsulated), 0);
            assert_eq!(before.delta(&after, Stat::EncapTooBig), 0);
            assert_eq!(before.delta(&after, Stat::Redirected), 1);
            assert_eq!(before.delta(&after, Stat::Bytes), frame.len() as u64);
        }
        let frame = v4(quic_short(&server_cid(0, SID[1], 1), 40)).build();
        assert_forwarded(&f, &frame, 1);
    }
}

#[test]
fn encapsulation_trims_ethernet_padding_and_uses_xdp_tx_for_the_same_interface() {
    let mut f = setup("encap-pad");
    let entry = encap(ENCAP_GUE, AF_INET, 1500);
    f.set_worker_encap(1, entry).unwrap();
    let d = v4(quic_short(&server_cid(0, SID[1], 1), 2));
    let datagram = d.build();
    let mut frame = datagram.clone();
    frame.extend_from_slice(&[0; 18]);
    let out = f.run(PROG, &frame).unwrap();
    assert_eq!(out.action, XDP_TX);
    assert_eq!(&out.frame[..6], &MACS[1]);
    assert_eq!(out.frame.len(), datagram.len() + 32, "padding trimmed");
    assert_eq!(&out.frame[46..], &datagram[14..]);
    assert_eq!(
        u16::from_be_bytes([out.frame[16], out.frame[17]]) as usize,
        out.frame.len() - 14
    );
}

#[test]
fn invalid_encap_entries_are_refused_and_dropped_if_written_anyway() {
    let mut f = setup("encap-bad");
    let mut bad = encap(ENCAP_IPIP, AF_INET, 1500);
    bad.mode = 3;
    assert!(f.set_worker_encap(0, bad).is_err(), "unknown mode refused");
    let mut unset = encap(ENCAP_IPIP, AF_INET6, 1500);
    unset.dst = [0; 16];
    assert!(
        f.set_worker_encap(0, unset).is_err(),
        "no destination refused"
    );
    f.set_worker_encap_unchecked(0, bad).unwrap();
    let before = stats(&f);
    let out = f.run(PROG, &inner_v4(100).build()).unwrap();
    assert_eq!(out.action, XDP_DROP);
    assert_eq!(before.delta(&stats(&f), Stat::NoWorker), 1);
}
