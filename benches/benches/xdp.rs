//! XDP per-packet cost by route kind, side by side with the reference program, under
//! BPF_PROG_TEST_RUN (in-kernel timing: the kernel runs the program `repeat` times on the same
//! frame and reports the mean). Every round runs every case once, interleaved, so drift (turbo,
//! other load) hits all of them alike; we report per-case medians over rounds and the ratio to
//! the reference's median. Needs root. Run: `cargo bench -p baton-benches --bench xdp`
//! (or `cargo xtask bench --only xdp`). Knobs: BATON_XDP_BENCH_ROUNDS (default 7),
//! BATON_XDP_BENCH_REPEAT (default 1000000), BATON_XDP_BENCH_BASELINE=<path to another build's
//! lb-ebpf object> (e.g. the one under target/*/build/lb-user-*/out/ before a change): that
//! object is loaded too, set up alike, and timed in the same rounds, for a before/after table.
//!
//! Besides the reference, `baton_xdp_forward_floor` is timed: the reference's walk plus the
//! forwarding every routed packet needs whatever the routing (MAC rewrite, counters, devmap
//! redirect). `floor+` is a case's cost above it: what the routing decision itself costs.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};
use lb_common::{
    AF_INET, AF_INET6, CidLayout, LbConfig, MAGLEV_TABLE_SIZE, QUIC_V1, VipKey, WORKER_HEALTHY,
    WORKER_IN_USE, WorkerEntry,
};
use lb_user::testrun::frames::{Datagram, LongType, quic_long, quic_short};
use lb_user::testrun::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XdpFixture};

const TARGET_RATIO: f64 = 1.5;
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const PORT: u16 = 443;

struct Case {
    name: &'static str,
    program: &'static str,
    frame: Vec<u8>,
    expect: u32,
    /// Route kinds are held to the target; the pass case is informational.
    routed: bool,
}

fn env_u32(name: &str, default: u32) -> Result<u32> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

fn cid(server_id: u64) -> [u8; 8] {
    let mut c = [0u8; 8];
    CidLayout::default()
        .encode(0, server_id, &[0x5a, 0x11, 0x22, 0x33, 0x44], &mut c)
        .expect("valid CID");
    c
}

fn setup(object: Option<&[u8]>) -> Result<XdpFixture> {
    let mut f = match object {
        None => XdpFixture::load("bench")?,
        Some(bytes) => XdpFixture::load_object("bench-baseline", bytes)?,
    };
    f.set_config(LbConfig {
        cid_len: 8,
        server_id_len: 2,
        ready: 1,
        _pad: 0,
        maglev_size: MAGLEV_TABLE_SIZE,
    })?;
    let mut v4 = VipKey {
        port: PORT,
        family: AF_INET,
        ..Default::default()
    };
    v4.addr[..4].copy_from_slice(&VIP4.octets());
    f.add_vip(v4)?;
    f.add_vip(VipKey {
        addr: VIP6.octets(),
        port: PORT,
        family: AF_INET6,
        _pad: 0,
    })?;
    for w in 0..2u32 {
        let entry = WorkerEntry {
            mac: [0x02, 0xaa, 0, 0, 0, w as u8],
            flags: WORKER_IN_USE | WORKER_HEALTHY,
            tx_port: w,
            _pad: 0,
            server_id: 0x0101 * (w as u64 + 1),
        };
        f.set_worker(w, entry)?;
        f.set_server_id(entry.server_id, w)?;
        // Both devmap slots → loopback: the test run returns XDP_REDIRECT without transmitting.
        f.set_tx_port(w, 1)?;
    }
    // A full-size table, as production uses, alternating workers.
    let table: Vec<u32> = (0..MAGLEV_TABLE_SIZE).map(|i| i % 2).collect();
    f.set_maglev(&table)?;
    // Some overrides so the override map is not trivially empty.
    for i in 0..1000u64 {
        f.set_override(&cid(0x0900 + i), (i % 2) as u32)?;
    }
    f.set_override(&cid(0x4242), 1)?;
    Ok(f)
}

fn cases() -> Vec<Case> {
    let v4 = |p: Vec<u8>| {
        Datagram::udp(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            IpAddr::V4(VIP4),
            PORT,
            p,
        )
        .build()
    };
    let v6 = |p: Vec<u8>| {
        Datagram::udp(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
            IpAddr::V6(VIP6),
            PORT,
            p,
        )
        .build()
    };
    let short = |c: [u8; 8]| quic_short(&c, 60);
    let client_dcid = [0xc3, 0x9e, 0x01, 0x77, 0x42, 0x10, 0xfe, 0x08];
    let case = |name, frame, expect| Case {
        name,
        program: "baton_xdp",
        frame,
        expect,
        routed: true,
    };
    vec![
        Case {
            name: "reference (parse to DCID, drop)",
            program: "baton_xdp_reference",
            frame: v4(short(cid(0x0101))),
            expect: XDP_DROP,
            routed: false,
        },
        Case {
            name: "forward floor (ref + fwd, no routing)",
            program: "baton_xdp_forward_floor",
            frame: v4(short(cid(0x0101))),
            expect: XDP_REDIRECT,
            routed: false,
        },
        case(
            "short hdr, override hit",
            v4(short(cid(0x4242))),
            XDP_REDIRECT,
        ),
        case("short hdr, server ID", v4(short(cid(0x0101))), XDP_REDIRECT),
        case(
            "short hdr, unknown SID -> hash",
            v4(short(cid(0x7777))),
            XDP_REDIRECT,
        ),
        case(
            "Initial, hashed (1200 B)",
            v4(quic_long(
                LongType::Initial,
                QUIC_V1,
                &client_dcid,
                &[1; 8],
                1200,
            )),
            XDP_REDIRECT,
        ),
        case(
            "Handshake, server ID",
            v4(quic_long(
                LongType::Handshake,
                QUIC_V1,
                &cid(0x0202),
                &[1; 8],
                300,
            )),
            XDP_REDIRECT,
        ),
        case(
            "IPv6 short hdr, server ID",
            v6(short(cid(0x0202))),
            XDP_REDIRECT,
        ),
        case(
            "IPv6 Initial, hashed",
            v6(quic_long(
                LongType::Initial,
                QUIC_V1,
                &client_dcid,
                &[1; 8],
                1200,
            )),
            XDP_REDIRECT,
        ),
        Case {
            name: "not a VIP -> pass",
            program: "baton_xdp",
            frame: Datagram::udp(
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
                IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)),
                53,
                vec![0; 40],
            )
            .build(),
            expect: XDP_PASS,
            routed: false,
        },
    ]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then one quick round
    // checks the cases still take their paths, as criterion's test mode does.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (rounds, repeat) = if quick {
        (1, 1000)
    } else {
        (
            env_u32("BATON_XDP_BENCH_ROUNDS", 7)?.max(1),
            env_u32("BATON_XDP_BENCH_REPEAT", 1_000_000)?,
        )
    };
    if quick {
        eprintln!("test mode (no --bench): one round of {repeat} runs, figures are not meaningful");
    } else if repeat < 1_000_000 {
        eprintln!(
            "note: BATON_XDP_BENCH_REPEAT={repeat} is below 1,000,000: expect noisier figures"
        );
    }
    let f = setup(None).context("setting up the XDP benchmark (run it as root)")?;
    let baseline_bytes = match std::env::var_os("BATON_XDP_BENCH_BASELINE") {
        Some(path) => Some(
            std::fs::read(&path).with_context(|| format!("reading {}", path.to_string_lossy()))?,
        ),
        None => None,
    };
    let baseline = match &baseline_bytes {
        Some(bytes) => Some(setup(Some(bytes)).context("setting up the baseline object")?),
        None => None,
    };
    let cases = cases();
    // Check every case takes the path it is named for before timing it.
    for c in &cases {
        for (which, fx) in [("", Some(&f)), ("baseline ", baseline.as_ref())] {
            let Some(fx) = fx else { continue };
            if fx.program(c.program).is_err() {
                continue;
            }
            let out = fx.run(c.program, &c.frame)?;
            if out.action != c.expect {
                bail!(
                    "{which}case {:?} returned action {} instead of {}",
                    c.name,
                    out.action,
                    c.expect
                );
            }
        }
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut base_samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for (i, c) in cases.iter().enumerate() {
            let out = f.run_repeat(c.program, &c.frame, repeat)?;
            samples[i].push(out.duration_ns as f64);
            if let Some(b) = baseline.as_ref().filter(|b| b.program(c.program).is_ok()) {
                base_samples[i].push(b.run_repeat(c.program, &c.frame, repeat)?.duration_ns as f64);
            }
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    let medians: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    let base_medians: Vec<Option<f64>> = base_samples
        .iter_mut()
        .map(|s| (!s.is_empty()).then(|| median(s)))
        .collect();
    let reference = medians[0];
    let floor = medians[1];
    let info = f.program("baton_xdp")?.info()?;
    println!();
    println!(
        "XDP per-packet cost, BPF_PROG_TEST_RUN, repeat {repeat}, {rounds} rounds (kernel mean per round; median, min and max over rounds)"
    );
    println!(
        "baton_xdp: {} instructions verified, {} bytes translated, {} bytes JITed",
        info.verified_instruction_count()
            .map_or("?".into(), |n| n.to_string()),
        info.size_translated().map_or("?".into(), |n| n.to_string()),
        info.size_jitted()
    );
    let base_hdr = if baseline.is_some() {
        format!(" {:>9} {:>7}", "baseline", "ratio")
    } else {
        String::new()
    };
    println!(
        "{:<40} {:>8} {:>6} {:>6} {:>7} {:>7}{base_hdr}  target",
        "case", "median", "min", "max", "ratio", "floor+"
    );
    let mut missed = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let (min, max) = samples[i]
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let ratio = medians[i] / reference;
        let verdict = if !c.routed {
            "-".to_string()
        } else if ratio <= TARGET_RATIO {
            format!("ok (<= {TARGET_RATIO}x)")
        } else {
            missed.push(c.name);
            format!("MISSED (> {TARGET_RATIO}x)")
        };
        let over_floor = if c.routed {
            format!("{:+.0}ns", medians[i] - floor)
        } else {
            "-".into()
        };
        let base_col = match (baseline.is_some(), base_medians[i], base_medians[0]) {
            (false, ..) => String::new(),
            (true, Some(b), Some(r)) => format!(" {:>7.0}ns {:>6.2}x", b, b / r),
            (true, ..) => format!(" {:>9} {:>7}", "-", "-"),
        };
        println!(
            "{:<40} {:>6.0}ns {:>4.0}ns {:>4.0}ns {:>6.2}x {:>7}{base_col}  {verdict}",
            c.name, medians[i], min, max, ratio, over_floor
        );
    }
    println!(
        "forward floor = {:.2}x the reference: the share of the target that forwarding alone (counters, MAC rewrite, \
         bpf_redirect_map) takes before any routing decision",
        floor / reference
    );
    if missed.is_empty() {
        println!("every route kind is within {TARGET_RATIO}x of the reference");
    } else {
        println!(
            "route kinds over {TARGET_RATIO}x of the reference: {}",
            missed.join(", ")
        );
    }
    Ok(())
}
