//! Where a worker is on the wire: the interface the route to it uses and its MAC from the
//! neighbour table (ARP/NDP). Uses iproute2's JSON output, which is the kernel's own view in the
//! current network namespace.
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

fn ip_json(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip -j {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Array(vec![]));
    }
    serde_json::from_str(&text)
        .with_context(|| format!("unexpected output from `ip -j {}`", args.join(" ")))
}

#[derive(Deserialize)]
struct RouteEntry {
    dev: Option<String>,
    gateway: Option<String>,
    prefsrc: Option<String>,
}

/// How the kernel would send to an address: out of `dev`, to `gateway` (or directly), from
/// `source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dev: String,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
}

impl Route {
    /// The neighbour a frame to the destination goes to: the gateway, or the destination itself.
    pub fn next_hop(&self, destination: IpAddr) -> IpAddr {
        self.gateway.unwrap_or(destination)
    }
}

/// The kernel's route to `addr` (`ip route get`).
pub fn route(addr: IpAddr) -> Result<Route> {
    let v = ip_json(&["route", "get", &addr.to_string()])?;
    let routes: Vec<RouteEntry> = serde_json::from_value(v)?;
    let r = routes
        .into_iter()
        .next()
        .with_context(|| format!("no route to {addr}"))?;
    let ip = |s: Option<String>| s.and_then(|s| s.parse::<IpAddr>().ok());
    Ok(Route {
        dev: r
            .dev
            .with_context(|| format!("the route to {addr} names no interface"))?,
        gateway: ip(r.gateway),
        source: ip(r.prefsrc),
    })
}

/// The interface the kernel would send to `addr` through. Fails if the route goes via a gateway:
/// layer-2 direct server return needs the worker on a directly connected segment.
pub fn route_interface(addr: IpAddr) -> Result<String> {
    let r = route(addr)?;
    if let Some(gw) = r.gateway {
        bail!(
            "{addr} is reached through gateway {gw}, not directly: layer-2 DSR needs each worker on a \
             segment the load balancer is attached to (set the worker's `interface` and an on-link \
             address, or encap = \"ipip\" / \"gue\" to reach it through routers)"
        );
    }
    Ok(r.dev)
}

#[derive(Deserialize)]
struct LinkEntry {
    mtu: Option<u32>,
}

/// The MTU of interface `dev`.
pub fn interface_mtu(dev: &str) -> Result<u16> {
    let v = ip_json(&["link", "show", "dev", dev])?;
    let links: Vec<LinkEntry> = serde_json::from_value(v)?;
    let mtu = links
        .into_iter()
        .next()
        .and_then(|l| l.mtu)
        .with_context(|| format!("`ip link show dev {dev}` gives no MTU"))?;
    Ok(mtu.min(u16::MAX as u32) as u16)
}

#[derive(Deserialize)]
struct NeighEntry {
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

fn lookup(addr: IpAddr, dev: &str) -> Result<Option<[u8; 6]>> {
    let v = ip_json(&["neigh", "show", "to", &addr.to_string(), "dev", dev])?;
    let entries: Vec<NeighEntry> = serde_json::from_value(v)?;
    for e in entries {
        if e.state.iter().any(|s| s == "FAILED" || s == "INCOMPLETE") {
            continue;
        }
        if let Some(mac) = e.lladdr.as_deref().and_then(crate::config::parse_mac) {
            return Ok(Some(mac));
        }
    }
    Ok(None)
}

/// The MAC of `addr` on `dev`. If the neighbour table has no usable entry, sends one UDP datagram
/// to the discard port so the kernel resolves it, then waits up to `timeout`.
pub fn resolve_mac(addr: IpAddr, dev: &str, timeout: Duration) -> Result<[u8; 6]> {
    if let Some(mac) = lookup(addr, dev)? {
        return Ok(mac);
    }
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let start = Instant::now();
    let mut last_poke = None::<Instant>;
    loop {
        if last_poke.is_none_or(|t| t.elapsed() > Duration::from_millis(300)) {
            // Any packet to the address makes the kernel run ARP/NDP for it.
            if let Ok(s) = UdpSocket::bind(bind) {
                let _ = s.send_to(b"baton-arp", SocketAddr::new(addr, 9));
            }
            last_poke = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
        if let Some(mac) = lookup(addr, dev)? {
            return Ok(mac);
        }
        if start.elapsed() > timeout {
            bail!(
                "could not resolve the MAC of {addr} on {dev} within {timeout:?}: is the worker up and on \
                 that segment? (or set the worker's `mac` explicitly)"
            );
        }
    }
}
