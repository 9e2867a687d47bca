//! `baton-lb`'s TOML configuration: parsed with serde, then validated into [`Config`] so every
//! mistake is reported with the field it concerns and what to do about it.
//!
//! ```toml
//! interface = "eth0"          # where clients' packets arrive; the XDP program attaches here
//! xdp_mode = "auto"           # native | skb | auto (native, falling back to skb with a warning)
//!
//! [cid]
//! length = 8                  # length of the CIDs the workers issue
//! server_id_length = 2        # bytes of server ID after the first octet
//!
//! [[vips]]
//! address = "192.0.2.10"
//! ports = [443]
//!
//! [[workers]]
//! name = "w1"
//! server_id = 1
//! address = "10.0.0.11"       # used for MAC resolution, the tx interface and health checks
//! mac = "auto"                # or "02:00:00:00:00:11"
//! # interface = "eth1"        # tx interface; default: the route to `address`
//! # weight = 1
//!
//! # Or, as one node of a cluster (docs/CLUSTER.md): no [[workers]]; they register in etcd.
//! # [cluster]
//! # endpoints = ["http://10.0.0.5:2379"]
//! # prefix = "/baton/prod"
//! # node = "lb1"              # default: the host name
//! ```
use anyhow::{Context, Result};
use lb_common::CidLayout;
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Default place of the control socket the CLI talks to.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/baton/baton.sock";

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Driver (native) mode; fail if the driver cannot do it.
    Native,
    /// Generic (SKB) mode: works on every interface, slower.
    Skb,
    /// Native, falling back to generic with a logged warning.
    #[default]
    Auto,
}

impl fmt::Display for XdpModeSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpModeSetting::Native => "native",
            XdpModeSetting::Skb => "skb",
            XdpModeSetting::Auto => "auto",
        })
    }
}

impl FromStr for XdpModeSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(Self::Native),
            "skb" => Ok(Self::Skb),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown XDP mode {other:?}: use native, skb or auto"
            )),
        }
    }
}

/// A worker's MAC address: given, or resolved from the neighbour table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacSetting {
    Fixed([u8; 6]),
    /// Look up `address` in the neighbour table (ARP / NDP), provoking resolution if needed.
    Auto,
}

/// How forwarded datagrams reach a worker (`encap` of a `[[workers]]` entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encap {
    /// Layer-2 direct server return: only the destination MAC changes; the worker must be on a
    /// segment the LB is attached to.
    #[default]
    None,
    /// IP in IP to the worker's address (protocol 4 or 41), through any router.
    Ipip,
    /// GUE (an outer UDP header to this port, then a 4-byte GUE header), through any router.
    Gue { port: u16 },
}

/// The GUE port when a worker's entry names none (the worker's `[decap] gue_port` must match).
pub const DEFAULT_GUE_PORT: u16 = 6080;

impl Encap {
    pub fn name(&self) -> &'static str {
        match self {
            Encap::None => "none",
            Encap::Ipip => "ipip",
            Encap::Gue { .. } => "gue",
        }
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Health-check probe kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// No probing: every worker counts as healthy.
    #[default]
    None,
    /// A TCP connect to `address:port` must succeed.
    Tcp,
    /// A UDP datagram with `payload` to `address:port` must be answered.
    Udp,
}

// ---- raw (as written) ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: String,
    #[serde(default)]
    xdp_mode: XdpModeSetting,
    #[serde(default)]
    cid: RawCid,
    #[serde(default)]
    vips: Vec<RawVip>,
    #[serde(default)]
    workers: Vec<RawWorker>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    cluster: Option<RawCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    endpoints: Vec<String>,
    prefix: String,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    lease_ttl_s: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCid {
    #[serde(default = "default_cid_len")]
    length: u8,
    #[serde(default = "default_sid_len")]
    server_id_length: u8,
}

impl Default for RawCid {
    fn default() -> Self {
        Self {
            length: default_cid_len(),
            server_id_length: default_sid_len(),
        }
    }
}

fn default_cid_len() -> u8 {
    CidLayout::default().cid_len() as u8
}
fn default_sid_len() -> u8 {
    CidLayout::default().server_id_len() as u8
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: String,
    ports: Vec<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    name: String,
    server_id: u64,
    address: String,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    encap: Option<String>,
    #[serde(default)]
    gue_port: Option<u16>,
    #[serde(default)]
    mtu: Option<u16>,
    #[serde(default)]
    encap_source: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default)]
    kind: HealthKind,
    port: Option<u16>,
    #[serde(default)]
    payload: Option<String>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<PathBuf>,
    metrics: Option<String>,
}

// ---- validated ----

#[derive(Clone, Debug)]
pub struct Config {
    pub interface: String,
    pub xdp_mode: XdpModeSetting,
    pub layout: CidLayout,
    pub vips: Vec<Vip>,
    pub workers: Vec<Worker>,
    pub health: Health,
    pub control_socket: PathBuf,
    /// Where to serve Prometheus metrics (`None` = off).
    pub metrics: Option<SocketAddr>,
    /// This LB is one node of a cluster: the workers and overrides come from etcd.
    pub cluster: Option<ClusterSettings>,
}

/// `[cluster]`: the etcd this node follows, and its name there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    pub endpoints: Vec<String>,
    pub prefix: baton_cluster::Prefix,
    /// The node's name (its `nodes/<node>/applied` key); the host name by default.
    pub node: String,
    /// Seconds this node's applied report outlives it if it dies (renewed every third).
    pub lease_ttl_s: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    pub address: IpAddr,
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worker {
    pub name: String,
    pub server_id: u64,
    pub address: IpAddr,
    pub mac: MacSetting,
    /// Interface to redirect to; `None` = whatever the route to `address` uses.
    pub interface: Option<String>,
    pub weight: u32,
    pub encap: Encap,
    /// Encapsulated: the largest outer datagram the path to the worker carries (`None`: the
    /// egress interface's MTU).
    pub mtu: Option<u16>,
    /// Encapsulated: the outer source address (`None`: the source the route to `address` picks).
    pub encap_source: Option<IpAddr>,
}

#[derive(Clone, Debug)]
pub struct Health {
    pub kind: HealthKind,
    pub port: u16,
    pub payload: Vec<u8>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy worker healthy.
    pub rise: u32,
    /// Consecutive failures that make a healthy worker unhealthy.
    pub fall: u32,
}

/// A configuration mistake: the field, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

fn bad(field: impl Into<String>, problem: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        problem: problem.into(),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        // toml's own errors name the line, column and key (unknown fields, wrong types).
        let raw: RawConfig = toml::from_str(text)?;
        Ok(validate(raw)?)
    }
}

fn validate(raw: RawConfig) -> Result<Config, FieldError> {
    if raw.interface.trim().is_empty() {
        return Err(bad(
            "interface",
            "must name the interface clients' packets arrive on (e.g. \"eth0\")",
        ));
    }
    if raw.interface.len() > 15 {
        return Err(bad(
            "interface",
            format!(
                "{:?} is longer than the 15 characters Linux allows",
                raw.interface
            ),
        ));
    }
    let layout = CidLayout::new(raw.cid.length, raw.cid.server_id_length).map_err(|e| {
        bad(
            "cid",
            format!(
                "length = {}, server_id_length = {}: {e}",
                raw.cid.length, raw.cid.server_id_length
            ),
        )
    })?;

    if raw.vips.is_empty() {
        return Err(bad(
            "vips",
            "at least one [[vips]] entry (address and ports) is required",
        ));
    }
    let mut vips = Vec::new();
    let mut seen_vip_ports = HashSet::new();
    for (i, v) in raw.vips.iter().enumerate() {
        let field = format!("vips[{i}]");
        let address: IpAddr = v.address.parse().map_err(|_| {
            bad(
                format!("{field}.address"),
                format!("{:?} is not an IPv4 or IPv6 address", v.address),
            )
        })?;
        if v.ports.is_empty() {
            return Err(bad(
                format!("{field}.ports"),
                "list at least one UDP port (e.g. [443])",
            ));
        }
        for &port in &v.ports {
            if port == 0 {
                return Err(bad(
                    format!("{field}.ports"),
                    "port 0 is not a usable UDP port",
                ));
            }
            if !seen_vip_ports.insert((address, port)) {
                return Err(bad(
                    format!("{field}.ports"),
                    format!("{address} port {port} is listed twice"),
                ));
            }
        }
        vips.push(Vip {
            address,
            ports: v.ports.clone(),
        });
    }
    if seen_vip_ports.len() > lb_common::MAX_VIPS as usize {
        return Err(bad(
            "vips",
            format!(
                "at most {} (address, port) pairs are supported",
                lb_common::MAX_VIPS
            ),
        ));
    }

    let cluster = raw.cluster.as_ref().map(validate_cluster).transpose()?;
    match (&cluster, raw.workers.is_empty()) {
        (None, true) => {
            return Err(bad(
                "workers",
                "at least one [[workers]] entry is required (or a [cluster] table, whose workers \
                 register in etcd)",
            ));
        }
        (Some(_), false) => {
            return Err(bad(
                "workers",
                "with [cluster] the workers come from etcd (each registers itself with its own \
                 [cluster] table): remove the [[workers]] entries",
            ));
        }
        _ => {}
    }
    if raw.workers.len() > lb_common::MAX_WORKERS as usize {
        return Err(bad(
            "workers",
            format!("at most {} workers are supported", lb_common::MAX_WORKERS),
        ));
    }
    let mut workers = Vec::new();
    let (mut names, mut sids) = (HashSet::new(), HashSet::new());
    for (i, w) in raw.workers.iter().enumerate() {
        let field = format!("workers[{i}]");
        if w.name.is_empty() || w.name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                format!("{field}.name"),
                format!("{:?} must be non-empty without spaces", w.name),
            ));
        }
        if !names.insert(w.name.clone()) {
            return Err(bad(
                format!("{field}.name"),
                format!("{:?} is used by another worker", w.name),
            ));
        }
        if w.server_id > layout.max_server_id() {
            return Err(bad(
                format!("{field}.server_id"),
                format!(
                    "{} does not fit in cid.server_id_length = {} bytes (largest is {})",
                    w.server_id,
                    layout.server_id_len(),
                    layout.max_server_id()
                ),
            ));
        }
        if !sids.insert(w.server_id) {
            return Err(bad(
                format!("{field}.server_id"),
                format!("{} is used by another worker", w.server_id),
            ));
        }
        let address: IpAddr = w.address.parse().map_err(|_| {
            bad(
                format!("{field}.address"),
                format!("{:?} is not an IPv4 or IPv6 address", w.address),
            )
        })?;
        let mac = match w.mac.as_deref() {
            None | Some("auto") => MacSetting::Auto,
            Some(s) => MacSetting::Fixed(parse_mac(s).ok_or_else(|| {
                bad(
                    format!("{field}.mac"),
                    format!("{s:?} is not a MAC like \"02:00:00:00:00:01\" (or use \"auto\")"),
                )
            })?),
        };
        if let Some(ifname) = &w.interface {
            if ifname.is_empty() || ifname.len() > 15 {
                return Err(bad(
                    format!("{field}.interface"),
                    format!("{ifname:?} is not a valid interface name"),
                ));
            }
        }
        let weight = w.weight.unwrap_or(1);
        if weight == 0 || weight > 1000 {
            return Err(bad(
                format!("{field}.weight"),
                format!("{weight} must be between 1 and 1000"),
            ));
        }
        let encap = match w.encap.as_deref() {
            None | Some("none") => Encap::None,
            Some("ipip") => Encap::Ipip,
            Some("gue") => Encap::Gue {
                port: w.gue_port.unwrap_or(DEFAULT_GUE_PORT),
            },
            Some(other) => {
                return Err(bad(
                    format!("{field}.encap"),
                    format!("{other:?} is not \"none\" (layer 2), \"ipip\" or \"gue\""),
                ));
            }
        };
        if w.gue_port.is_some() && !matches!(encap, Encap::Gue { .. }) {
            return Err(bad(
                format!("{field}.gue_port"),
                "is only for encap = \"gue\"",
            ));
        }
        if w.gue_port == Some(0) {
            return Err(bad(format!("{field}.gue_port"), "0 is not a port"));
        }
        if encap == Encap::None && (w.mtu.is_some() || w.encap_source.is_some()) {
            return Err(bad(
                format!("{field}.encap"),
                "mtu and encap_source describe an encapsulated path: set encap = \"ipip\" or \"gue\"",
            ));
        }
        let min_mtu = if address.is_ipv4() { 576 } else { 1280 };
        if let Some(mtu) = w.mtu.filter(|m| *m < min_mtu) {
            return Err(bad(
                format!("{field}.mtu"),
                format!("{mtu} is below the minimum for {address} ({min_mtu})"),
            ));
        }
        let encap_source = match &w.encap_source {
            None => None,
            Some(s) => {
                let ip: IpAddr = s.parse().map_err(|_| {
                    bad(
                        format!("{field}.encap_source"),
                        format!("{s:?} is not an IPv4 or IPv6 address"),
                    )
                })?;
                if ip.is_ipv4() != address.is_ipv4() {
                    return Err(bad(
                        format!("{field}.encap_source"),
                        format!(
                            "{ip} and the worker's address {address} are of different families"
                        ),
                    ));
                }
                Some(ip)
            }
        };
        if encap != Encap::None && matches!(mac, MacSetting::Fixed(_)) {
            return Err(bad(
                format!("{field}.mac"),
                "an encapsulated worker's next hop is the router on the way to it: leave mac out (\"auto\")",
            ));
        }
        workers.push(Worker {
            name: w.name.clone(),
            server_id: w.server_id,
            address,
            mac,
            interface: w.interface.clone(),
            weight,
            encap,
            mtu: w.mtu,
            encap_source,
        });
    }

    let h = &raw.health;
    let port = match (h.kind, h.port) {
        (HealthKind::None, p) => p.unwrap_or(0),
        (_, Some(p)) if p != 0 => p,
        (_, _) => {
            return Err(bad(
                "health.port",
                "a tcp or udp health check needs the port to probe",
            ));
        }
    };
    let interval = Duration::from_millis(h.interval_ms.unwrap_or(1000));
    let timeout = Duration::from_millis(h.timeout_ms.unwrap_or(500));
    if interval < Duration::from_millis(50) {
        return Err(bad("health.interval_ms", "must be at least 50"));
    }
    if timeout.is_zero() || timeout > interval {
        return Err(bad(
            "health.timeout_ms",
            "must be between 1 and health.interval_ms",
        ));
    }
    let (rise, fall) = (h.rise.unwrap_or(2), h.fall.unwrap_or(3));
    if rise == 0 {
        return Err(bad("health.rise", "must be at least 1"));
    }
    if fall == 0 {
        return Err(bad("health.fall", "must be at least 1"));
    }
    let health = Health {
        kind: h.kind,
        port,
        payload: h
            .payload
            .clone()
            .unwrap_or_else(|| "baton-health".into())
            .into_bytes(),
        interval,
        timeout,
        rise,
        fall,
    };

    let metrics = match &raw.control.metrics {
        None => None,
        Some(s) => Some(s.parse::<SocketAddr>().map_err(|_| {
            bad(
                "control.metrics",
                format!("{s:?} is not an address:port like \"127.0.0.1:9650\""),
            )
        })?),
    };
    let control_socket = raw
        .control
        .socket
        .clone()
        .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into());
    if control_socket.as_os_str().is_empty() {
        return Err(bad("control.socket", "must be a path"));
    }

    Ok(Config {
        interface: raw.interface,
        xdp_mode: raw.xdp_mode,
        layout,
        vips,
        workers,
        health,
        control_socket,
        metrics,
        cluster,
    })
}

fn validate_cluster(c: &RawCluster) -> Result<ClusterSettings, FieldError> {
    if c.endpoints.is_empty() {
        return Err(bad(
            "cluster.endpoints",
            "list etcd's client URLs, e.g. [\"http://10.0.0.5:2379\"]",
        ));
    }
    let prefix =
        baton_cluster::Prefix::new(&c.prefix).map_err(|e| bad("cluster.prefix", e.to_string()))?;
    let node = match &c.node {
        Some(n) => n.clone(),
        None => crate::sys::hostname().ok_or_else(|| {
            bad(
                "cluster.node",
                "the host name cannot be read: give this node a name",
            )
        })?,
    };
    baton_cluster::check_name(&node).map_err(|e| bad("cluster.node", e.to_string()))?;
    let lease_ttl_s = c.lease_ttl_s.unwrap_or(10);
    if lease_ttl_s < 2 {
        return Err(bad("cluster.lease_ttl_s", "must be at least 2 (seconds)"));
    }
    Ok(ClusterSettings {
        endpoints: c.endpoints.clone(),
        prefix,
        node,
        lease_ttl_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interface = "eth0"
xdp_mode = "skb"
[cid]
length = 8
server_id_length = 2
[[vips]]
address = "192.0.2.10"
ports = [443, 4433]
[[vips]]
address = "2001:db8::10"
ports = [443]
[[workers]]
name = "w1"
server_id = 1
address = "10.0.0.11"
mac = "02:00:00:00:00:11"
interface = "eth1"
[[workers]]
name = "w2"
server_id = 2
address = "10.0.0.12"
weight = 2
[health]
kind = "udp"
port = 4433
[control]
metrics = "127.0.0.1:9650"
"#;

    #[test]
    fn good_config_parses() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.interface, "eth0");
        assert_eq!(c.xdp_mode, XdpModeSetting::Skb);
        assert_eq!(c.vips.len(), 2);
        assert_eq!(c.workers[0].mac, MacSetting::Fixed([2, 0, 0, 0, 0, 0x11]));
        assert_eq!(c.workers[1].mac, MacSetting::Auto);
        assert_eq!(c.workers[1].weight, 2);
        assert_eq!(c.health.kind, HealthKind::Udp);
        assert_eq!(c.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
    }

    fn err(text: &str) -> String {
        format!("{:#}", Config::parse(text).unwrap_err())
    }

    #[test]
    fn a_cluster_node_takes_its_workers_from_etcd() {
        let base = GOOD.split("[[workers]]").next().unwrap().to_string();
        let cluster = "[cluster]\nendpoints = [\"http://10.0.0.5:2379\"]\nprefix = \"/baton/prod\"\nnode = \"lb1\"\n";
        let c = Config::parse(&format!("{base}{cluster}")).unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!((cl.node.as_str(), cl.lease_ttl_s), ("lb1", 10));
        assert_eq!(cl.prefix.as_str(), "/baton/prod/");
        assert!(c.workers.is_empty());
        // Without a node name, the host's.
        let c = Config::parse(&format!(
            "{base}{}",
            cluster.replace("node = \"lb1\"\n", "")
        ))
        .unwrap();
        assert_eq!(Some(c.cluster.unwrap().node), crate::sys::hostname());
        let e = err(&format!("{GOOD}{cluster}"));
        assert!(e.contains("workers") && e.contains("come from etcd"), "{e}");
        let e = err(&base);
        assert!(e.contains("[cluster]"), "{e}");
        let e = err(&format!(
            "{base}{}",
            cluster.replace("/baton/prod", "baton")
        ));
        assert!(e.contains("cluster.prefix"), "{e}");
        let e = err(&format!("{base}{}", cluster.replace("lb1", "lb 1")));
        assert!(e.contains("cluster.node"), "{e}");
        let e = err(&format!("{base}{cluster}lease_ttl_s = 1\n"));
        assert!(e.contains("cluster.lease_ttl_s"), "{e}");
        let e = err(&format!(
            "{base}{}",
            cluster.replace("[\"http://10.0.0.5:2379\"]", "[]")
        ));
        assert!(e.contains("cluster.endpoints"), "{e}");
    }

    #[test]
    fn encapsulated_workers_parse_and_bad_settings_name_the_field() {
        let w2 = "address = \"10.0.0.12\"\nweight = 2";
        let c = Config::parse(
            &GOOD.replace(w2, "address = \"10.9.0.12\"\nencap = \"gue\"\nmtu = 9000"),
        )
        .unwrap();
        assert_eq!(c.workers[0].encap, Encap::None);
        assert_eq!(
            c.workers[1].encap,
            Encap::Gue {
                port: DEFAULT_GUE_PORT
            }
        );
        assert_eq!(c.workers[1].mtu, Some(9000));
        let c = Config::parse(&GOOD.replace(
            w2,
            "address = \"2001:db8:9::12\"\nencap = \"ipip\"\nencap_source = \"2001:db8::1\"",
        ))
        .unwrap();
        assert_eq!(c.workers[1].encap, Encap::Ipip);
        assert_eq!(
            c.workers[1].encap_source,
            Some("2001:db8::1".parse().unwrap())
        );
        for (replacement, want) in [
            ("encap = \"vxlan\"", "workers[1].encap"),
            ("gue_port = 7000", "workers[1].gue_port"),
            ("encap = \"gue\"\ngue_port = 0", "workers[1].gue_port"),
            ("mtu = 1400", "workers[1].encap"),
            ("encap = \"ipip\"\nmtu = 500", "workers[1].mtu"),
            (
                "encap = \"ipip\"\nencap_source = \"2001:db8::1\"",
                "different families",
            ),
            (
                "encap = \"ipip\"\nmac = \"02:00:00:00:00:12\"",
                "workers[1].mac",
            ),
        ] {
            let e = err(&GOOD.replace(w2, &format!("address = \"10.0.0.12\"\n{replacement}")));
            assert!(e.contains(want), "{replacement}: {e}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(&GOOD.replace("server_id = 2", "server_id = 70000"));
        assert!(
            e.contains("workers[1].server_id") && e.contains("65535"),
            "{e}"
        );
        let e = err(&GOOD.replace("server_id = 2", "server_id = 1"));
        assert!(
            e.contains("workers[1].server_id") && e.contains("another worker"),
            "{e}"
        );
        let e = err(&GOOD.replace("02:00:00:00:00:11", "02:00:00:00:11"));
        assert!(e.contains("workers[0].mac"), "{e}");
        let e = err(&GOOD.replace("192.0.2.10", "192.0.2"));
        assert!(e.contains("vips[0].address"), "{e}");
        let e = err(&GOOD.replace("server_id_length = 2", "server_id_length = 4"));
        assert!(e.contains("cid") && e.contains("nonce"), "{e}");
        let e = err(&GOOD.replace("xdp_mode = \"skb\"", "xdp_mode = \"fast\""));
        assert!(e.contains("xdp_mode"), "{e}");
        let e = err(&GOOD.replace("kind = \"udp\"\nport = 4433", "kind = \"udp\""));
        assert!(e.contains("health.port"), "{e}");
        let e = err(&GOOD.replace("weight = 2", "wieght = 2"));
        assert!(e.contains("wieght"), "{e}");
    }
}
