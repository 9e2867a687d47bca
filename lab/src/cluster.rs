//! The cluster lab: N LB nodes behind a router that spreads flows over them with ECMP (hashing
//! on ports, `fib_multipath_hash_policy=1`), the workers and an etcd on one layer-2 segment that
//! every LB node reaches (a bridge in a switch namespace):
//!
//! ```text
//!  <client>        <router>  VIP/32: ECMP                 <lb1> [XDP on {p}-lb1-up]
//!  {p}-cl ──── {p}-rt-cl    {p}-rt-lb1 ─────────────── {p}-lb1-up  N.21.2
//!  N.1.2       N.1.1        N.21.1                      {p}-lb1-sw N.10.1 ──┐
//!                           {p}-rt-lb2 ─────────────── {p}-lb2-up  N.22.2   │ <switch> br0
//!                           N.22.1                 <lb2> {p}-lb2-sw N.10.2 ──┤── {p}-w1 N.10.11 <w1>
//!                                                                            ├── {p}-w2 N.10.12 <w2>
//!                                                                            └── {p}-etcd N.10.100 <etcd>
//! ```
//! Workers hold the VIP on loopback and answer from it (direct server return) through any LB
//! node, which forwards their replies as ordinary IP. The router also reaches the worker segment
//! (for the operator's `baton` on the client host: etcd and the workers' control API) through the
//! LB nodes. IPv4 only.
//!
//! The same [`Addressing`] as the single-node lab, so a test's private cluster lab never meets
//! the fixed one; namespaces are removed when the [`ClusterNetns`] guard goes.
use crate::{Addressing, link_exists, loopback_addrs, ns_exists, ns_sh, sh, sh_quiet, sysctl};
use anyhow::{Result, bail};

/// At most this many LB nodes (the router's links are N.21 to N.(20+MAX)).
pub const MAX_LB_NODES: usize = 8;

#[derive(Clone, Debug)]
pub struct ClusterTopology {
    pub client: String,
    pub router: String,
    pub switch: String,
    pub etcd: String,
    /// One namespace per LB node, `lb1`, `lb2`, ...
    pub lbs: Vec<String>,
    pub workers: [String; 2],
    pub addressing: Addressing,
}

impl ClusterTopology {
    /// Namespaces `<base>-cl`, `-rt`, `-sw`, `-etcd`, `-lb1..N`, `-w1`, `-w2`.
    pub fn new(base: &str, lb_nodes: usize, addressing: Addressing) -> Result<ClusterTopology> {
        if !(1..=MAX_LB_NODES).contains(&lb_nodes) {
            bail!("--lb-nodes must be between 1 and {MAX_LB_NODES}, got {lb_nodes}");
        }
        Ok(ClusterTopology {
            client: format!("{base}-cl"),
            router: format!("{base}-rt"),
            switch: format!("{base}-sw"),
            etcd: format!("{base}-etcd"),
            lbs: (1..=lb_nodes).map(|k| format!("{base}-lb{k}")).collect(),
            workers: [format!("{base}-w1"), format!("{base}-w2")],
            addressing,
        })
    }

    pub fn namespaces(&self) -> Vec<&str> {
        let mut v = vec![self.client.as_str(), &self.router, &self.switch, &self.etcd];
        v.extend(self.lbs.iter().map(String::as_str));
        v.extend(self.workers.iter().map(String::as_str));
        v
    }

    fn dev(&self, name: &str) -> String {
        format!("{}-{name}", self.addressing.dev_prefix)
    }

    fn net4(&self, subnet: u32, host: u32) -> String {
        format!("{}.{subnet}.{host}", self.addressing.net4)
    }

    /// LB node `k`'s (0-based) interface towards the router: XDP runs there.
    pub fn lb_uplink_dev(&self, k: usize) -> String {
        self.dev(&format!("lb{}-up", k + 1))
    }

    /// LB node `k`'s interface on the worker segment.
    pub fn lb_segment_dev(&self, k: usize) -> String {
        self.dev(&format!("lb{}-sw", k + 1))
    }

    /// LB node `k`'s address on its router link.
    pub fn lb_uplink_addr(&self, k: usize) -> String {
        self.net4(21 + k as u32, 2)
    }

    /// LB node `k`'s address on the worker segment.
    pub fn lb_segment_addr(&self, k: usize) -> String {
        self.net4(10, 1 + k as u32)
    }

    /// Worker `i`'s (0-based) address on the segment.
    pub fn worker_addr4(&self, i: usize) -> String {
        self.net4(10, 11 + i as u32)
    }

    /// etcd's address on the segment.
    pub fn etcd_addr(&self) -> String {
        self.net4(10, 100)
    }

    pub fn client_addr(&self) -> String {
        self.net4(1, 2)
    }

    /// The router's interface towards LB node `k`.
    pub fn router_dev(&self, k: usize) -> String {
        self.dev(&format!("rt-lb{}", k + 1))
    }

    /// A veth pair `a`@`ns_a` (address `addr_a`/24, or none) to `b`@`ns_b`.
    fn pair(
        &self,
        ns_a: &str,
        a: &str,
        addr_a: Option<&str>,
        ns_b: &str,
        b: &str,
        addr_b: Option<&str>,
    ) -> Result<()> {
        if !(link_exists(ns_a, a) && link_exists(ns_b, b)) {
            let _ = sh(&["ip", "-n", ns_a, "link", "del", a]);
            let _ = sh(&["ip", "-n", ns_b, "link", "del", b]);
            sh(&[
                "ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns",
                ns_b,
            ])?;
        }
        for (ns, dev, addr) in [(ns_a, a, addr_a), (ns_b, b, addr_b)] {
            if let Some(addr) = addr {
                sh(&[
                    "ip",
                    "-n",
                    ns,
                    "addr",
                    "replace",
                    &format!("{addr}/24"),
                    "dev",
                    dev,
                ])?;
            }
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sysctl(ns, &format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
        }
        Ok(())
    }

    /// The ECMP route to `dst` over every LB node in `nodes` (0-based), as the upstream router's
    /// BGP would install it for the VIP the nodes announce.
    pub fn ecmp_route(&self, dst: &str, nodes: &[usize]) -> Result<()> {
        let mut args: Vec<String> = ["ip", "-n", &self.router, "route", "replace", dst]
            .map(String::from)
            .to_vec();
        for &k in nodes {
            args.extend(
                [
                    "nexthop",
                    "via",
                    &self.lb_uplink_addr(k),
                    "dev",
                    &self.router_dev(k),
                ]
                .map(String::from),
            );
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sh(&args).map(drop)
    }

    /// Routes the VIP (and the worker segment) only through `nodes`: what the router does when
    /// the others' BGP sessions end (an LB node died).
    pub fn route_through(&self, nodes: &[usize]) -> Result<()> {
        self.ecmp_route(&format!("{}/32", self.addressing.vip4), nodes)?;
        self.ecmp_route(&format!("{}.10.0/24", self.addressing.net4), nodes)
    }

    /// Creates everything (idempotent, like [`crate::Topology::up`]).
    pub fn up(&self) -> Result<()> {
        for ns in self.namespaces() {
            if !ns_exists(ns) {
                sh(&["ip", "netns", "add", ns])?;
            }
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            sysctl(ns, "net.ipv4.conf.all.rp_filter", "0")?;
            sysctl(ns, "net.ipv4.conf.default.rp_filter", "0")?;
        }
        // Client to router. The client computes its UDP checksums in software (ENVIRONMENT.md).
        let (cl, rt, sw) = (&self.client, &self.router, &self.switch);
        self.pair(
            cl,
            &self.dev("cl"),
            Some(&self.client_addr()),
            rt,
            &self.dev("rt-cl"),
            Some(&self.net4(1, 1)),
        )?;
        sh(&[
            "ip",
            "-n",
            cl,
            "route",
            "replace",
            "default",
            "via",
            &self.net4(1, 1),
        ])?;
        ns_sh(cl, &["ethtool", "-K", &self.dev("cl"), "tx", "off"])?;
        sysctl(rt, "net.ipv4.ip_forward", "1")?;
        // ECMP by the 5-tuple, so one QUIC flow keeps its node and flows spread over the nodes.
        sysctl(rt, "net.ipv4.fib_multipath_hash_policy", "1")?;
        // The switch: one bridge for the worker segment.
        if !link_exists(sw, "br0") {
            sh(&["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])?;
        }
        sh(&["ip", "-n", sw, "link", "set", "br0", "up"])?;
        let port = |ns: &str, dev: String, peer: String, addr: &str| -> Result<()> {
            self.pair(ns, &dev, Some(addr), sw, &peer, None)?;
            sh(&["ip", "-n", sw, "link", "set", &peer, "master", "br0"])?;
            // Native XDP_REDIRECT into a veth delivers only if the peer runs NAPI: GRO turns it on.
            ns_sh(sw, &["ethtool", "-K", &peer, "gro", "on"])?;
            Ok(())
        };
        for (k, lb) in self.lbs.iter().enumerate() {
            self.pair(
                rt,
                &self.router_dev(k),
                Some(&self.net4(21 + k as u32, 1)),
                lb,
                &self.lb_uplink_dev(k),
                Some(&self.lb_uplink_addr(k)),
            )?;
            port(
                lb,
                self.lb_segment_dev(k),
                self.dev(&format!("s-lb{}", k + 1)),
                &self.lb_segment_addr(k),
            )?;
            sysctl(lb, "net.ipv4.ip_forward", "1")?;
            sh(&[
                "ip",
                "-n",
                lb,
                "route",
                "replace",
                "default",
                "via",
                &self.net4(21 + k as u32, 1),
            ])?;
        }
        let all: Vec<usize> = (0..self.lbs.len()).collect();
        self.route_through(&all)?;
        let segment_default = |ns: &str| -> Result<()> {
            let mut args: Vec<String> = ["ip", "-n", ns, "route", "replace", "default"]
                .map(String::from)
                .to_vec();
            for k in 0..self.lbs.len() {
                args.extend(["nexthop", "via", &self.lb_segment_addr(k)].map(String::from));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            sh(&args).map(drop)
        };
        port(
            &self.etcd,
            self.dev("etcd"),
            self.dev("s-etcd"),
            &self.etcd_addr(),
        )?;
        segment_default(&self.etcd)?;
        let (vip4, vip6) = (self.addressing.vip4, self.addressing.vip6);
        for (i, ns) in self.workers.iter().enumerate() {
            let dev = self.dev(&format!("w{}", i + 1));
            port(
                ns,
                dev.clone(),
                self.dev(&format!("s-w{}", i + 1)),
                &self.worker_addr4(i),
            )?;
            // The workers serve both VIPs (the IPv6 one is not routed here, but they bind it).
            loopback_addrs(ns, &[format!("{vip4}/32"), format!("{vip6}/128")])?;
            segment_default(ns)?;
            for (k, v) in [
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
            ] {
                sysctl(ns, k, v)?;
            }
            ns_sh(ns, &["ethtool", "-K", &dev, "gro", "on"])?;
        }
        Ok(())
    }
}

/// A cluster lab removed when this goes out of scope.
pub struct ClusterNetns {
    pub topology: ClusterTopology,
}

impl ClusterNetns {
    pub fn up(topology: ClusterTopology) -> Result<ClusterNetns> {
        let lab = ClusterNetns { topology };
        lab.topology.up()?;
        Ok(lab)
    }
}

impl std::ops::Deref for ClusterNetns {
    type Target = ClusterTopology;
    fn deref(&self) -> &ClusterTopology {
        &self.topology
    }
}

impl Drop for ClusterNetns {
    fn drop(&mut self) {
        for ns in self.topology.namespaces() {
            sh_quiet(&["ip", "netns", "del", ns]);
        }
    }
}
