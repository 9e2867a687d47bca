//! `cargo xtask lab up|down`: a network-namespace lab for Baton.
//!
//! ```text
//!  baton-client            baton-lb                         baton-w1 (VIP on lo)
//!  bt-cl ───────────── bt-lb-cl  [XDP baton_xdp]
//!  10.200.1.2              10.200.1.1       bt-lb-w1 ────── bt-w1  10.200.11.2
//!  fd00:200:1::2           ip_forward=1     10.200.11.1
//!                                           bt-lb-w2 ────── bt-w2  10.200.12.2   baton-w2 (VIP on lo)
//!                                           10.200.12.1
//! ```
//! The client routes everything via the LB. XDP on `bt-lb-cl` rewrites the destination MAC of VIP
//! traffic to the chosen worker's and redirects it out of `bt-lb-w1`/`bt-lb-w2` (layer-2 DSR).
//! Workers hold the VIP on loopback (arp_ignore/arp_announce keep them from claiming it on the
//! wire) and answer from the VIP via their default route, which the LB forwards as ordinary IP.
use crate::util::{require_root, workspace_root};
use anyhow::{Context, Result, bail};
use std::process::Command;

#[derive(clap::Subcommand)]
pub enum Action {
    /// Create the namespaces, links, addresses and routes (idempotent: re-running repairs).
    Up,
    /// Remove the namespaces the lab made (and with them its interfaces).
    Down,
}

pub const CLIENT_NS: &str = "baton-client";
pub const LB_NS: &str = "baton-lb";
pub const VIP4: &str = "10.200.100.1";
pub const VIP6: &str = "fd00:200:100::1";

/// One veth pair: (namespace, name, IPv4/prefix, IPv6/prefix, MAC) on each end.
struct End {
    ns: &'static str,
    dev: &'static str,
    v4: &'static str,
    v6: &'static str,
    mac: &'static str,
}

struct Pair {
    a: End,
    b: End,
}

const PAIRS: [Pair; 3] = [
    Pair {
        a: End {
            ns: CLIENT_NS,
            dev: "bt-cl",
            v4: "10.200.1.2/24",
            v6: "fd00:200:1::2/64",
            mac: "02:ba:00:01:00:02",
        },
        b: End {
            ns: LB_NS,
            dev: "bt-lb-cl",
            v4: "10.200.1.1/24",
            v6: "fd00:200:1::1/64",
            mac: "02:ba:00:01:00:01",
        },
    },
    Pair {
        a: End {
            ns: "baton-w1",
            dev: "bt-w1",
            v4: "10.200.11.2/24",
            v6: "fd00:200:11::2/64",
            mac: "02:ba:00:0b:00:02",
        },
        b: End {
            ns: LB_NS,
            dev: "bt-lb-w1",
            v4: "10.200.11.1/24",
            v6: "fd00:200:11::1/64",
            mac: "02:ba:00:0b:00:01",
        },
    },
    Pair {
        a: End {
            ns: "baton-w2",
            dev: "bt-w2",
            v4: "10.200.12.2/24",
            v6: "fd00:200:12::2/64",
            mac: "02:ba:00:0c:00:02",
        },
        b: End {
            ns: LB_NS,
            dev: "bt-lb-w2",
            v4: "10.200.12.1/24",
            v6: "fd00:200:12::1/64",
            mac: "02:ba:00:0c:00:01",
        },
    },
];

const NAMESPACES: [&str; 4] = [CLIENT_NS, LB_NS, "baton-w1", "baton-w2"];

pub fn run(action: Action) -> Result<()> {
    require_root("cargo xtask lab")?;
    match action {
        Action::Up => up(),
        Action::Down => down(),
    }
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ns_sh(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    sh(&full)
}

fn ns_exists(ns: &str) -> bool {
    std::path::Path::new("/run/netns").join(ns).exists()
}

fn link_exists(ns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", dev])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn sysctl(ns: &str, key: &str, val: &str) -> Result<()> {
    ns_sh(ns, &["sysctl", "-qw", &format!("{key}={val}")])
}

fn up() -> Result<()> {
    up_quiet()?;
    print_summary();
    Ok(())
}

/// `lab up` without the summary (for `cargo xtask demo`).
pub fn up_quiet() -> Result<()> {
    for ns in NAMESPACES {
        if !ns_exists(ns) {
            sh(&["ip", "netns", "add", ns])?;
        }
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    }
    for p in &PAIRS {
        if !(link_exists(p.a.ns, p.a.dev) && link_exists(p.b.ns, p.b.dev)) {
            // A half-made pair (interrupted run): remove what is left and start over.
            let _ = sh(&["ip", "-n", p.a.ns, "link", "del", p.a.dev]);
            let _ = sh(&["ip", "-n", p.b.ns, "link", "del", p.b.dev]);
            sh(&[
                "ip", "link", "add", p.a.dev, "netns", p.a.ns, "type", "veth", "peer", "name",
                p.b.dev, "netns", p.b.ns,
            ])?;
        }
        for e in [&p.a, &p.b] {
            sh(&["ip", "-n", e.ns, "link", "set", e.dev, "address", e.mac])?;
            sysctl(e.ns, &format!("net.ipv6.conf.{}.accept_dad", e.dev), "0")?;
            sh(&["ip", "-n", e.ns, "addr", "replace", e.v4, "dev", e.dev])?;
            sh(&[
                "ip", "-n", e.ns, "addr", "replace", e.v6, "dev", e.dev, "nodad",
            ])?;
            sh(&["ip", "-n", e.ns, "link", "set", e.dev, "up"])?;
        }
    }
    // Client: everything via the LB. Locally sent UDP leaves a veth with CHECKSUM_PARTIAL, which a
    // native XDP redirect cannot finish: have the sender compute checksums in software.
    sh(&[
        "ip",
        "-n",
        CLIENT_NS,
        "route",
        "replace",
        "default",
        "via",
        "10.200.1.1",
    ])?;
    sh(&[
        "ip",
        "-n",
        CLIENT_NS,
        "-6",
        "route",
        "replace",
        "default",
        "via",
        "fd00:200:1::1",
    ])?;
    ns_sh(CLIENT_NS, &["ethtool", "-K", "bt-cl", "tx", "off"])?;

    // LB: a router for ordinary traffic (workers' replies), no source-path filtering (replies
    // come from the VIP on a worker-facing interface).
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        sysctl(LB_NS, k, v)?;
    }
    for dev in ["bt-lb-cl", "bt-lb-w1", "bt-lb-w2"] {
        sysctl(LB_NS, &format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
    }

    // Workers: VIP on loopback, answer ARP only for addresses on the asking interface, replies via the LB.
    for (ns, dev, gw4, gw6) in [
        ("baton-w1", "bt-w1", "10.200.11.1", "fd00:200:11::1"),
        ("baton-w2", "bt-w2", "10.200.12.1", "fd00:200:12::1"),
    ] {
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "replace",
            &format!("{VIP4}/32"),
            "dev",
            "lo",
        ])?;
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "replace",
            &format!("{VIP6}/128"),
            "dev",
            "lo",
        ])?;
        sh(&["ip", "-n", ns, "route", "replace", "default", "via", gw4])?;
        sh(&[
            "ip", "-n", ns, "-6", "route", "replace", "default", "via", gw6,
        ])?;
        for (k, v) in [
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            (&format!("net.ipv4.conf.{dev}.rp_filter"), "0"),
        ] {
            sysctl(ns, k, v)?;
        }
        // Native XDP_REDIRECT into a veth delivers only if the peer runs NAPI: GRO turns it on.
        ns_sh(ns, &["ethtool", "-K", dev, "gro", "on"])?;
    }
    Ok(())
}

fn down() -> Result<()> {
    down_quiet()?;
    if std::path::Path::new("/sys/fs/bpf/baton").exists() {
        println!(
            "note: /sys/fs/bpf/baton still holds baton-lb's pins (the lab did not make them): \
             `baton-lb detach` removes them"
        );
    }
    Ok(())
}

/// Removes the lab's namespaces, saying which.
pub fn down_quiet() -> Result<()> {
    let mut removed = 0;
    for ns in NAMESPACES {
        if ns_exists(ns) {
            sh(&["ip", "netns", "del", ns])?;
            println!("removed namespace {ns}");
            removed += 1;
        }
    }
    if removed == 0 {
        println!("no lab namespaces were present");
    }
    Ok(())
}

fn print_summary() {
    println!("Baton lab is up:");
    for p in &PAIRS {
        for e in [&p.a, &p.b] {
            println!(
                "  {:<13} {:<9} {:<15} {:<18} {}",
                e.ns, e.dev, e.v4, e.v6, e.mac
            );
        }
    }
    println!("  VIP {VIP4} and {VIP6} (UDP 4433) on lo in baton-w1 and baton-w2");
    let cfg = workspace_root().join("lab/lb.toml");
    println!();
    println!("Next:");
    println!("  cargo build --release -p lb-user");
    println!(
        "  sudo target/release/baton-lb --netns {LB_NS} --config {}",
        cfg.display()
    );
    println!("  sudo target/release/baton status");
    println!("  sudo bpftool map dump pinned /sys/fs/bpf/baton/BATON_WORKERS");
    println!("  (`ip netns exec` would hide the host's bpffs from baton-lb: use --netns)");
}
