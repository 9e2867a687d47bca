//! Baton's network-namespace lab, the one topology `cargo xtask lab` builds (fixed names,
//! [`FIXED`] addresses) and every netns test builds for itself (uniquely named namespaces,
//! [`PRIVATE`] addresses):
//!
//! ```text
//!  <client>                <lb>                              <w1> (VIP on lo)
//!  {p}-cl ──────────── {p}-lb-cl  [XDP baton_xdp]
//!  N.1.2                   N.1.1            {p}-lb-w1 ────── {p}-w1  N.11.2
//!  N6:1::2                 ip_forward=1     N.11.1
//!                                           {p}-lb-w2 ────── {p}-w2  N.12.2   <w2> (VIP on lo)
//!                                           N.12.1
//! ```
//! (`{p}` is [`Addressing::dev_prefix`], `N`/`N6` are [`Addressing::net4`]/[`Addressing::net6`].)
//! The client routes everything via the LB. XDP on `{p}-lb-cl` rewrites the destination MAC of VIP
//! traffic to the chosen worker's and redirects it out of `{p}-lb-w1`/`{p}-lb-w2` (layer-2 DSR).
//! Workers hold the VIP on loopback (arp_ignore/arp_announce keep them from claiming it on the
//! wire) and answer from the VIP via their default route, which the LB forwards as ordinary IP.
//! Each worker also holds a routed address on loopback (`N.11<i>.2`, `N6:11<i>::2`) that the LB
//! reaches through a gateway (the worker's link address): what encapsulated forwarding (IPIP,
//! GUE) is addressed to, as to a worker on another subnet.
//!
//! Building is idempotent (re-running repairs a half-made lab), [`Topology::down`] removes the
//! namespaces (and with them every interface), a [`Netns`] guard does that on drop, and
//! [`sweep_namespaces`] removes what test processes that died left behind.
//!
//! Deliberately light (std, anyhow, libc): xtask builds it on a fresh clone.
pub mod cluster;

use anyhow::{Context, Result, bail};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The address plan of a lab: what differs between the fixed lab and the tests' private ones.
#[derive(Clone, Copy, Debug)]
pub struct Addressing {
    /// First two octets of every IPv4 network (`10.200` gives `10.200.1.0/24`, ...).
    pub net4: &'static str,
    /// First two groups of every IPv6 network (`fd00:200` gives `fd00:200:1::/64`, ...).
    pub net6: &'static str,
    /// The VIPs the workers hold on loopback.
    pub vip4: &'static str,
    pub vip6: &'static str,
    /// Prefix of every interface name (`bt` gives `bt-cl`, `bt-lb-cl`, `bt-w1`, ...).
    pub dev_prefix: &'static str,
}

/// The lab of `cargo xtask lab` (and the demo and benchmarks).
pub const FIXED: Addressing = Addressing {
    net4: "10.200",
    net6: "fd00:200",
    vip4: "10.200.100.1",
    vip6: "fd00:200:100::1",
    dev_prefix: "bt",
};

/// The tests' private labs (each in namespaces of its own, so they never meet the fixed lab).
pub const PRIVATE: Addressing = Addressing {
    net4: "10.201",
    net6: "fd00:201",
    vip4: "10.201.100.1",
    vip6: "fd00:201:100::1",
    dev_prefix: "t",
};

/// Namespace names of the fixed lab.
pub const FIXED_CLIENT_NS: &str = "baton-client";
pub const FIXED_LB_NS: &str = "baton-lb";
pub const FIXED_WORKER_NS: [&str; 2] = ["baton-w1", "baton-w2"];

/// One end of a veth pair.
#[derive(Clone, Debug)]
pub struct End {
    pub ns: String,
    pub dev: String,
    /// Address with prefix length (`10.200.1.2/24`).
    pub v4: String,
    pub v6: String,
    pub mac: String,
}

/// A veth pair: `a` in the client's or a worker's namespace, `b` in the LB's.
#[derive(Clone, Debug)]
pub struct Pair {
    pub a: End,
    pub b: End,
}

/// A lab: its namespace names and its address plan.
#[derive(Clone, Debug)]
pub struct Topology {
    pub client: String,
    pub lb: String,
    pub workers: [String; 2],
    pub addressing: Addressing,
}

impl Topology {
    /// The fixed lab (`baton-client`, `baton-lb`, `baton-w1`, `baton-w2`, [`FIXED`]).
    pub fn fixed() -> Topology {
        Topology {
            client: FIXED_CLIENT_NS.into(),
            lb: FIXED_LB_NS.into(),
            workers: FIXED_WORKER_NS.map(String::from),
            addressing: FIXED,
        }
    }

    /// A private lab in namespaces `<base>-cl`, `<base>-lb`, `<base>-w1`, `<base>-w2` ([`PRIVATE`]).
    pub fn private(base: &str) -> Topology {
        Topology {
            client: format!("{base}-cl"),
            lb: format!("{base}-lb"),
            workers: [format!("{base}-w1"), format!("{base}-w2")],
            addressing: PRIVATE,
        }
    }

    /// Every namespace: client, LB, workers.
    pub fn namespaces(&self) -> [&str; 4] {
        [&self.client, &self.lb, &self.workers[0], &self.workers[1]]
    }

    /// Interface `name` with the lab's prefix (`dev("lb-cl")` is `bt-lb-cl` in the fixed lab).
    pub fn dev(&self, name: &str) -> String {
        format!("{}-{name}", self.addressing.dev_prefix)
    }

    /// The LB's interface towards the client (where XDP runs).
    pub fn lb_client_dev(&self) -> String {
        self.dev("lb-cl")
    }

    /// The LB's interface towards worker `i` (0-based).
    pub fn lb_worker_dev(&self, i: usize) -> String {
        self.dev(&format!("lb-w{}", i + 1))
    }

    /// The client's gateway (the LB's address on the client link).
    pub fn client_gateway4(&self) -> String {
        format!("{}.1.1", self.addressing.net4)
    }

    pub fn client_gateway6(&self) -> String {
        format!("{}:1::1", self.addressing.net6)
    }

    /// Worker `i`'s (0-based) own address on its link (not the VIP).
    pub fn worker_addr4(&self, i: usize) -> String {
        format!("{}.1{}.2", self.addressing.net4, i + 1)
    }

    pub fn worker_addr6(&self, i: usize) -> String {
        format!("{}:1{}::2", self.addressing.net6, i + 1)
    }

    /// Worker `i`'s routed address: on its loopback, on a subnet of its own (`N.11<i+1>.0/24`)
    /// that the LB reaches through a gateway (the worker's link address), as a worker on another
    /// subnet is reached through routers. Encapsulated datagrams (IPIP, GUE) are sent to it.
    pub fn worker_routed_addr4(&self, i: usize) -> String {
        format!("{}.11{}.2", self.addressing.net4, i + 1)
    }

    pub fn worker_routed_addr6(&self, i: usize) -> String {
        format!("{}:11{}::2", self.addressing.net6, i + 1)
    }

    /// The veth pairs: client-LB, then worker 1-LB and worker 2-LB.
    pub fn pairs(&self) -> [Pair; 3] {
        let (n4, n6) = (self.addressing.net4, self.addressing.net6);
        // Subnet `s` (1: client, 11/12: workers), also the MAC's fourth byte (01, 0b, 0c).
        let end = |ns: &str, dev: String, s: u32, host: u32| End {
            ns: ns.into(),
            dev,
            v4: format!("{n4}.{s}.{host}/24"),
            v6: format!("{n6}:{s}::{host}/64"),
            mac: format!("02:ba:00:{s:02x}:00:{host:02x}"),
        };
        let worker = |i: usize| Pair {
            a: end(
                &self.workers[i],
                self.dev(&format!("w{}", i + 1)),
                11 + i as u32,
                2,
            ),
            b: end(&self.lb, self.lb_worker_dev(i), 11 + i as u32, 1),
        };
        [
            Pair {
                a: end(&self.client, self.dev("cl"), 1, 2),
                b: end(&self.lb, self.lb_client_dev(), 1, 1),
            },
            worker(0),
            worker(1),
        ]
    }

    /// Creates the namespaces, links, addresses, routes and sysctls. Idempotent: what exists is
    /// kept (and its addresses and routes replaced), a half-made veth pair is made again.
    pub fn up(&self) -> Result<()> {
        for ns in self.namespaces() {
            if !ns_exists(ns) {
                sh(&["ip", "netns", "add", ns])?;
            }
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        for p in &self.pairs() {
            if !(link_exists(&p.a.ns, &p.a.dev) && link_exists(&p.b.ns, &p.b.dev)) {
                // A half-made pair (interrupted run): remove what is left and start over.
                let _ = sh(&["ip", "-n", &p.a.ns, "link", "del", &p.a.dev]);
                let _ = sh(&["ip", "-n", &p.b.ns, "link", "del", &p.b.dev]);
                sh(&[
                    "ip", "link", "add", &p.a.dev, "netns", &p.a.ns, "type", "veth", "peer",
                    "name", &p.b.dev, "netns", &p.b.ns,
                ])?;
            }
            for e in [&p.a, &p.b] {
                sh(&["ip", "-n", &e.ns, "link", "set", &e.dev, "address", &e.mac])?;
                sysctl(&e.ns, &format!("net.ipv6.conf.{}.accept_dad", e.dev), "0")?;
                sh(&["ip", "-n", &e.ns, "addr", "replace", &e.v4, "dev", &e.dev])?;
                sh(&[
                    "ip", "-n", &e.ns, "addr", "replace", &e.v6, "dev", &e.dev, "nodad",
                ])?;
                sh(&["ip", "-n", &e.ns, "link", "set", &e.dev, "up"])?;
            }
        }
        // Client: everything via the LB. Locally sent UDP leaves a veth with CHECKSUM_PARTIAL,
        // which a native XDP redirect cannot finish: have the sender compute checksums in
        // software (see ENVIRONMENT.md).
        let cl = &self.client;
        let (gw4, gw6) = (self.client_gateway4(), self.client_gateway6());
        sh(&["ip", "-n", cl, "route", "replace", "default", "via", &gw4])?;
        sh(&[
            "ip", "-n", cl, "-6", "route", "replace", "default", "via", &gw6,
        ])?;
        ns_sh(cl, &["ethtool", "-K", &self.dev("cl"), "tx", "off"])?;

        // LB: a router for ordinary traffic (workers' replies), no source-path filtering (replies
        // come from the VIP on a worker-facing interface).
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            sysctl(&self.lb, k, v)?;
        }
        for dev in [
            self.lb_client_dev(),
            self.lb_worker_dev(0),
            self.lb_worker_dev(1),
        ] {
            sysctl(&self.lb, &format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
        }

        // Workers: VIP on loopback, answer ARP only for addresses on the asking interface,
        // replies via the LB.
        let (vip4, vip6) = (self.addressing.vip4, self.addressing.vip6);
        for (i, ns) in self.workers.iter().enumerate() {
            let dev = self.dev(&format!("w{}", i + 1));
            let gw4 = format!("{}.1{}.1", self.addressing.net4, i + 1);
            let gw6 = format!("{}:1{}::1", self.addressing.net6, i + 1);
            loopback_addrs(ns, &[format!("{vip4}/32"), format!("{vip6}/128")])?;
            sh(&["ip", "-n", ns, "route", "replace", "default", "via", &gw4])?;
            sh(&[
                "ip", "-n", ns, "-6", "route", "replace", "default", "via", &gw6,
            ])?;
            // The routed address, and the LB's route to it through the worker's link address.
            let (r4, r6) = (self.worker_routed_addr4(i), self.worker_routed_addr6(i));
            loopback_addrs(ns, &[format!("{r4}/32"), format!("{r6}/128")])?;
            let lb = &self.lb;
            let (via4, via6) = (self.worker_addr4(i), self.worker_addr6(i));
            sh(&[
                "ip",
                "-n",
                lb,
                "route",
                "replace",
                &format!("{r4}/32"),
                "via",
                &via4,
            ])?;
            sh(&[
                "ip",
                "-n",
                lb,
                "-6",
                "route",
                "replace",
                &format!("{r6}/128"),
                "via",
                &via6,
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
            ns_sh(ns, &["ethtool", "-K", &dev, "gro", "on"])?;
        }
        Ok(())
    }

    /// Removes the lab's namespaces (and with them its interfaces); returns the ones that were
    /// there. Tries every namespace; the first failure is the error.
    pub fn down(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut failed = None;
        for ns in self.namespaces() {
            if ns_exists(ns) {
                match sh(&["ip", "netns", "del", ns]) {
                    Ok(_) => removed.push(ns.to_string()),
                    Err(e) => failed = failed.or(Some(e)),
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    /// Resolves the client's gateway (ARP and NDP), within `limit`: packets queued behind a
    /// neighbour solicitation lost at link-up would wait a whole retransmit second.
    pub fn wait_for_gateway(&self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        for gw in [self.client_gateway4(), self.client_gateway6()] {
            let ip: IpAddr = gw.parse().context("gateway address")?;
            loop {
                in_netns(&self.client, move || {
                    let s = UdpSocket::bind(if ip.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" });
                    if let Ok(s) = s {
                        let _ = s.send_to(b"warm-up", SocketAddr::new(ip, 9));
                    }
                });
                let out = sh(&["ip", "-n", &self.client, "neigh", "show", &gw])?;
                let text = String::from_utf8_lossy(&out.stdout);
                if text.contains("lladdr")
                    && !text.contains("FAILED")
                    && !text.contains("INCOMPLETE")
                {
                    break;
                }
                if start.elapsed() >= limit {
                    bail!(
                        "client cannot resolve its gateway {gw} in {} s: {text}",
                        limit.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

/// A lab that is removed when this goes out of scope (also when a test fails).
pub struct Netns {
    pub topology: Topology,
}

impl Netns {
    /// Builds `topology` (see [`Topology::up`]); if that fails, removes what was made.
    pub fn up(topology: Topology) -> Result<Netns> {
        let lab = Netns { topology };
        lab.topology.up()?;
        Ok(lab)
    }
}

impl std::ops::Deref for Netns {
    type Target = Topology;
    fn deref(&self) -> &Topology {
        &self.topology
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in self.topology.namespaces() {
            sh_quiet(&["ip", "netns", "del", ns]);
        }
    }
}

/// Runs a command; its output if it succeeded, else an error with its stderr.
pub fn sh(args: &[&str]) -> Result<Output> {
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
    Ok(out)
}

/// Runs a command, ignoring how it went (for cleanup).
pub fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs a command inside namespace `ns` (`ip netns exec`).
pub fn ns_sh(ns: &str, args: &[&str]) -> Result<Output> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    sh(&full)
}

/// Sets sysctl `key` to `val` in namespace `ns`.
pub fn sysctl(ns: &str, key: &str, val: &str) -> Result<()> {
    ns_sh(ns, &["sysctl", "-qw", &format!("{key}={val}")]).map(drop)
}

/// Puts each address (`addr/len`) on the loopback of `ns` (idempotent): VIPs, routed addresses.
pub fn loopback_addrs(ns: &str, addrs: &[String]) -> Result<()> {
    for a in addrs {
        sh(&["ip", "-n", ns, "addr", "replace", a, "dev", "lo"])?;
    }
    Ok(())
}

pub fn ns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

pub fn link_exists(ns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", dev])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `f` on a thread inside network namespace `ns`. Sockets created there stay in that
/// namespace after the thread ends (membership is per thread, sockets keep theirs).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: valid netns fd; affects only this thread.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns {path}"
        );
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// Whether `name` is `<prefix><pid><sep>...` for a pid that is gone: left by a process that died
/// without cleaning up.
pub fn owner_is_dead(name: &str, prefix: &str, sep: char) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.split(sep).next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes the namespaces named `<prefix><pid><sep>...` whose process is gone (see
/// [`owner_is_dead`]).
pub fn sweep_namespaces(prefix: &str, sep: char) {
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_is_dead(&name, prefix, sep) {
                sh_quiet(&["ip", "netns", "del", &name]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed lab's plan, spelled out (what `cargo xtask lab up` prints and lab/lb.toml uses).
    #[test]
    fn fixed_lab_addresses() {
        let t = Topology::fixed();
        let p = t.pairs();
        let row = |e: &End| format!("{} {} {} {} {}", e.ns, e.dev, e.v4, e.v6, e.mac);
        let rows: Vec<String> = p.iter().flat_map(|p| [row(&p.a), row(&p.b)]).collect();
        assert_eq!(
            rows,
            [
                "baton-client bt-cl 10.200.1.2/24 fd00:200:1::2/64 02:ba:00:01:00:02",
                "baton-lb bt-lb-cl 10.200.1.1/24 fd00:200:1::1/64 02:ba:00:01:00:01",
                "baton-w1 bt-w1 10.200.11.2/24 fd00:200:11::2/64 02:ba:00:0b:00:02",
                "baton-lb bt-lb-w1 10.200.11.1/24 fd00:200:11::1/64 02:ba:00:0b:00:01",
                "baton-w2 bt-w2 10.200.12.2/24 fd00:200:12::2/64 02:ba:00:0c:00:02",
                "baton-lb bt-lb-w2 10.200.12.1/24 fd00:200:12::1/64 02:ba:00:0c:00:01",
            ]
        );
        assert_eq!(t.worker_addr4(1), "10.200.12.2");
        assert_eq!(t.worker_addr6(0), "fd00:200:11::2");
        assert_eq!(t.client_gateway6(), "fd00:200:1::1");
    }

    /// lab/lb.toml (the config `cargo xtask lab up` points at) names the fixed lab's interfaces,
    /// VIPs, worker addresses and w2's fixed MAC.
    #[test]
    fn lb_toml_matches_the_fixed_lab() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/lb.toml")).unwrap();
        let t = Topology::fixed();
        let p = t.pairs();
        for want in [
            format!("interface = \"{}\"", t.lb_client_dev()),
            format!("interface = \"{}\"", t.lb_worker_dev(0)),
            format!("address = \"{}\"", FIXED.vip4),
            format!("address = \"{}\"", FIXED.vip6),
            format!("address = \"{}\"", t.worker_addr4(0)),
            format!("address = \"{}\"", t.worker_addr4(1)),
            format!("mac = \"{}\"", p[2].a.mac),
            format!("--netns {}", t.lb),
        ] {
            assert!(text.contains(&want), "lab/lb.toml lacks {want}");
        }
    }

    #[test]
    fn private_lab_names() {
        let t = Topology::private("btt7x0");
        assert_eq!(
            t.namespaces(),
            ["btt7x0-cl", "btt7x0-lb", "btt7x0-w1", "btt7x0-w2"]
        );
        assert_eq!(t.lb_client_dev(), "t-lb-cl");
        assert_eq!(t.pairs()[2].a.v4, "10.201.12.2/24");
        assert_eq!(t.worker_addr4(0), "10.201.11.2");
    }

    #[test]
    fn dead_owners() {
        let me = std::process::id();
        assert!(!owner_is_dead(&format!("btt{me}x3-cl"), "btt", 'x'));
        assert!(!owner_is_dead("baton-client", "btt", 'x'));
        // Pids are below 2^22 on Linux.
        assert!(owner_is_dead("btt4294967294x0-lb", "btt", 'x'));
    }
}
