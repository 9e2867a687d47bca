//! `baton-worker` TOML configuration.
use serde::Deserialize;
use std::net::IpAddr;
use std::path::PathBuf;

/// Example:
/// ```toml
/// vips = ["192.0.2.10", "2001:db8::10"]  # the service addresses, on the worker's loopback
/// # vip = "192.0.2.10"    # the same for a single VIP (give `vip` or `vips`, not both)
/// port = 4433
/// server_id = 1           # carried in every CID this worker issues (QUIC-LB layout)
/// cid_len = 8
/// server_id_len = 2
/// cert = "/etc/baton/cert.pem"
/// key = "/etc/baton/key.pem"
/// service = "demo"
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// One VIP: shorthand for `vips = [vip]` (configs written before `vips` existed).
    #[serde(default)]
    pub vip: Option<IpAddr>,
    /// Every VIP clients reach this worker on, IPv4 and IPv6 (direct server return: each sits on
    /// the worker's loopback). The worker binds `port` on each and answers every connection from
    /// the VIP its client addressed. After [`parse`](Self::parse) this holds `vip` too.
    #[serde(default)]
    pub vips: Vec<IpAddr>,
    #[serde(default = "default_port")]
    pub port: u16,
    pub server_id: u64,
    #[serde(default = "default_cid_len")]
    pub cid_len: u8,
    #[serde(default = "default_server_id_len")]
    pub server_id_len: u8,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default = "default_service")]
    pub service: String,
    /// Name of this worker (as in the LB's and the controller's configs); default `worker-<server_id>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Control socket (JSON lines, `docs/MIGRATION-FLOW.md`). Set it to take part in migrations;
    /// then `secrets` and `[peer]` are required too.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// `secrets.toml`: token secret and snapshot key, identical on every worker (mode 0600; the
    /// controller holds only the token secret). Re-read on SIGHUP.
    #[serde(default)]
    pub secrets: Option<PathBuf>,
    #[serde(default)]
    pub peer: Option<PeerConfig>,
    /// The control API over TCP with mutual TLS, for a controller on another host (next to the
    /// Unix `control_socket`, which it needs).
    #[serde(default)]
    pub control_tls: Option<ControlTlsConfig>,
    /// Receive and send buffer of the VIP socket, in bytes (default 4 MiB). The kernel caps it
    /// at net.core.rmem_max/wmem_max unless the worker runs with CAP_NET_ADMIN (then
    /// SO_RCVBUFFORCE/SO_SNDBUFFORCE apply it as given); the worker logs what it got. 0 keeps the
    /// kernel's default.
    #[serde(default = "default_socket_buffer")]
    pub socket_buffer: usize,
    /// What the worker holds for its clients: QUIC windows and service buffers, per stream, per
    /// connection and in all (see [`crate::limits::Limits`] for the keys and defaults).
    #[serde(default)]
    pub limits: crate::limits::Limits,
    /// Where to serve Prometheus metrics (`ip:port`, `GET /metrics`); unset: no metrics.
    #[serde(default)]
    pub metrics: Option<std::net::SocketAddr>,
    /// The HTTP/3 reverse proxy (`service = "proxy"`): upstreams, routes, timeouts, limits
    /// (see [`crate::http3::config::ProxyConfig`] and `docs/HTTP3.md`).
    #[serde(default)]
    pub proxy: Option<crate::http3::config::ProxyConfig>,
    /// Membership of a Baton cluster in etcd (`docs/CLUSTER.md`): the worker registers itself
    /// under a lease and claims its server ID in a transaction; it refuses to start while another
    /// worker holds that ID. Without it the worker is part of no cluster (single-node set-up).
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// Datagrams the load balancer encapsulated for this worker (IPIP, GUE): the worker takes the
    /// outer header off itself (see [`crate::decap`] and `docs/CLUSTER.md`). Unset: layer-2 only.
    #[serde(default)]
    pub decap: Option<crate::decap::DecapConfig>,
}

/// `[cluster]` of a worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd's client URLs, e.g. `["http://10.0.0.5:2379"]`.
    pub endpoints: Vec<String>,
    /// The cluster's key prefix, one per cluster (e.g. `/baton/prod`).
    pub prefix: String,
    /// Where LB nodes send this worker's datagrams: its address on their segment (layer 2), or
    /// with `encap` any address of this host they can route to.
    pub address: IpAddr,
    /// Seconds the registration outlives the worker if it dies without revoking it (it renews
    /// every third of this).
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_s: i64,
    /// Relative share of new connections (Maglev weight).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// How LB nodes reach this worker: `"ipip"` or `"gue"` (the port is `[decap] gue_port`),
    /// which `[decap]` must accept; unset: layer 2 (`address` on the LB nodes' segment).
    #[serde(default)]
    pub encap: Option<String>,
}

impl ClusterConfig {
    /// The encapsulation this worker registers (checked by [`WorkerConfig::parse`]).
    pub fn record_encap(
        &self,
        decap: Option<&crate::decap::DecapConfig>,
    ) -> anyhow::Result<Option<baton_cluster::RecordEncap>> {
        let decap = decap.cloned().unwrap_or_default();
        match self.encap.as_deref() {
            None | Some("none") => Ok(None),
            Some("ipip") => {
                anyhow::ensure!(
                    decap.ipip,
                    "cluster.encap = \"ipip\" needs [decap] ipip = true"
                );
                Ok(Some(baton_cluster::RecordEncap::Ipip))
            }
            Some("gue") => {
                let port = decap.gue_port.ok_or_else(|| {
                    anyhow::anyhow!("cluster.encap = \"gue\" needs [decap] gue_port")
                })?;
                Ok(Some(baton_cluster::RecordEncap::Gue { port }))
            }
            Some(other) => {
                anyhow::bail!("cluster.encap: {other:?} is not \"none\", \"ipip\" or \"gue\"")
            }
        }
    }
}

fn default_lease_ttl() -> i64 {
    10
}

fn default_weight() -> u32 {
    1
}

/// The worker-to-worker channel (quinn, mutual TLS).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// A concrete address other workers can reach (it is what this worker tells the controller).
    pub listen: std::net::SocketAddr,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Every worker of the deployment (this one may be listed too, so one list serves all): the
    /// only peers admitted on the peer channel (by certificate name), the server ID each may
    /// send transfers as, and the address a migration to it dials.
    #[serde(default)]
    pub workers: Vec<PeerWorker>,
}

/// One worker on the peer channel: its certificate name (DNS SAN, what `gen-certs` writes as
/// the worker name), server ID and peer-channel address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerWorker {
    pub name: String,
    pub server_id: u32,
    pub peer: std::net::SocketAddr,
}

/// The control API (same JSON lines as `control_socket`) over TCP, TLS 1.3 with mutual
/// authentication: a client must present a certificate signed by `ca` whose DNS SAN is one of
/// `clients`; anything else is refused at the handshake.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlTlsConfig {
    /// Address to listen on (`ip:port`). Firewall it: only the controller needs to reach it.
    pub listen: std::net::SocketAddr,
    /// CA certificate(s) that sign the allowed clients' certificates.
    pub ca: PathBuf,
    /// This worker's server certificate chain and key (the peer certificate can be reused).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client identities allowed to use the API, matched against the client certificate's DNS
    /// names (e.g. `["baton-controller"]`).
    pub clients: Vec<String>,
    /// At most this many authenticated clients at once (certificate accepted, ALPN negotiated);
    /// one more is answered `busy` and closed. Connections still handshaking do not count: they
    /// have their own limits (`control::MAX_PENDING_HANDSHAKES`, per address and in all).
    #[serde(default = "default_control_max_clients")]
    pub max_clients: usize,
}

fn default_control_max_clients() -> usize {
    16
}

fn default_port() -> u16 {
    4433
}
fn default_cid_len() -> u8 {
    8
}
fn default_server_id_len() -> u8 {
    2
}
fn default_socket_buffer() -> usize {
    4 << 20
}
fn default_service() -> String {
    "demo".into()
}

impl WorkerConfig {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut c: Self = toml::from_str(text)?;
        match (c.vip, c.vips.is_empty()) {
            (Some(_), false) => anyhow::bail!(
                "both `vip` and `vips` are set: list every VIP in `vips` (or give a single one \
                 as `vip`)"
            ),
            (Some(v), true) => c.vips = vec![v],
            (None, true) => anyhow::bail!(
                "no VIP: set `vips = [\"<IPv4>\", \"<IPv6>\"]` (or `vip = \"<address>\"` for one)"
            ),
            (None, false) => {}
        }
        for (i, v) in c.vips.iter().enumerate() {
            anyhow::ensure!(
                !v.is_unspecified(),
                "VIP {v} is the wildcard address: give the concrete VIPs clients send to, so \
                 every reply leaves from the address its client addressed"
            );
            anyhow::ensure!(!c.vips[..i].contains(v), "VIP {v} is listed twice");
        }
        c.limits.validate().map_err(anyhow::Error::msg)?;
        if let Some(cl) = &c.cluster {
            anyhow::ensure!(
                !cl.endpoints.is_empty(),
                "cluster.endpoints is empty: list etcd's client URLs (e.g. [\"http://10.0.0.5:2379\"])"
            );
            baton_cluster::Prefix::new(&cl.prefix)
                .map_err(|e| anyhow::anyhow!("cluster.prefix: {e}"))?;
            anyhow::ensure!(
                cl.lease_ttl_s >= 2,
                "cluster.lease_ttl_s must be at least 2 (seconds)"
            );
            anyhow::ensure!(cl.weight >= 1, "cluster.weight must be at least 1");
            baton_cluster::check_name(&c.name()).map_err(|e| anyhow::anyhow!("name: {e}"))?;
            cl.record_encap(c.decap.as_ref())?;
        }
        if let Some(d) = &c.decap {
            anyhow::ensure!(
                d.enabled(),
                "[decap] accepts nothing: set gue_port (GUE) and/or ipip = true, or remove the table"
            );
            anyhow::ensure!(
                d.gue_port != Some(0) && d.gue_port != Some(c.port),
                "decap.gue_port must be a port of its own (not 0, not the VIP port {})",
                c.port
            );
        }
        if c.control_socket.is_some() {
            anyhow::ensure!(
                c.secrets.is_some(),
                "control_socket is set, so `secrets` (secrets.toml) is needed too"
            );
            anyhow::ensure!(
                c.peer.is_some(),
                "control_socket is set, so a [peer] table (listen, ca, cert, key) is needed too"
            );
        }
        if let Some(t) = &c.control_tls {
            anyhow::ensure!(
                c.control_socket.is_some(),
                "[control_tls] is set, so control_socket (and secrets, [peer]) are needed too: \
                 the TCP listener serves the same API as the control socket"
            );
            anyhow::ensure!(
                !t.clients.is_empty(),
                "control_tls.clients is empty: list the client certificate names allowed to \
                 drive this worker (e.g. [\"baton-controller\"])"
            );
            for n in &t.clients {
                anyhow::ensure!(
                    rustls::pki_types::DnsName::try_from(n.as_str()).is_ok(),
                    "control_tls.clients: {n:?} is not a DNS name (it is matched against the \
                     client certificate's DNS names)"
                );
            }
            anyhow::ensure!(
                t.max_clients > 0,
                "control_tls.max_clients must be at least 1"
            );
        }
        if let Some(p) = &c.peer {
            anyhow::ensure!(
                !p.listen.ip().is_unspecified(),
                "peer.listen must be a concrete address other workers reach, not {}",
                p.listen.ip()
            );
            let others = p
                .workers
                .iter()
                .filter(|w| w.server_id as u64 != c.server_id);
            anyhow::ensure!(
                others.count() > 0,
                "peer.workers lists no other worker: list every worker of the deployment \
                 (`workers = [{{ name = \"w2\", server_id = 2, peer = \"10.0.0.12:4470\" }}]`); \
                 only they are admitted on the peer channel"
            );
            for (i, w) in p.workers.iter().enumerate() {
                anyhow::ensure!(
                    rustls::pki_types::DnsName::try_from(w.name.as_str()).is_ok(),
                    "peer.workers: {:?} is not a DNS name (it is matched against the peer \
                     certificate's DNS names)",
                    w.name
                );
                for earlier in &p.workers[..i] {
                    anyhow::ensure!(
                        earlier.name != w.name && earlier.server_id != w.server_id,
                        "peer.workers lists {} (server ID {}) twice",
                        w.name,
                        w.server_id
                    );
                }
            }
        }
        match (c.service.as_str(), &c.proxy) {
            ("proxy", None) => anyhow::bail!(
                "service = \"proxy\" needs a [proxy] section with its upstreams and routes \
                 (docs/HTTP3.md)"
            ),
            ("proxy", Some(p)) => p.validate().map_err(|e| anyhow::anyhow!("{e}"))?,
            ("demo", Some(_)) => anyhow::bail!(
                "a [proxy] section is set but service = \"demo\": set service = \"proxy\" or \
                 remove [proxy]"
            ),
            ("demo", None) => {}
            (other, _) => anyhow::bail!("unknown service {other:?} (known: demo, proxy)"),
        }
        Ok(c)
    }

    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("worker-{}", self.server_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let c = WorkerConfig::parse(
            "vip = \"192.0.2.10\"\nserver_id = 3\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap();
        assert_eq!(c.port, 4433);
        assert_eq!(c.server_id, 3);
        assert_eq!(c.service, "demo");
        assert_eq!(c.socket_buffer, 4 << 20);
        let small = WorkerConfig::parse(
            "vip = \"192.0.2.10\"\nserver_id = 3\ncert = \"c.pem\"\nkey = \"k.pem\"\nsocket_buffer = 65536\n",
        )
        .unwrap();
        assert_eq!(small.socket_buffer, 65536);
        assert_eq!(small.vips, ["192.0.2.10".parse::<IpAddr>().unwrap()]);
        assert!(WorkerConfig::parse("vip = \"x\"").is_err());
        assert_eq!(small.limits, crate::limits::Limits::default());
        let limited = WorkerConfig::parse(
            "vip = \"192.0.2.10\"\nserver_id = 3\ncert = \"c.pem\"\nkey = \"k.pem\"\nmetrics = \"127.0.0.1:9651\"\n[limits]\nmemory_budget = 67108864\n",
        )
        .unwrap();
        assert_eq!(limited.limits.memory_budget, 64 << 20);
        assert_eq!(limited.metrics, Some("127.0.0.1:9651".parse().unwrap()));
        let e = WorkerConfig::parse(
            "vip = \"192.0.2.10\"\nserver_id = 3\ncert = \"c.pem\"\nkey = \"k.pem\"\n[limits]\nmemory_budget = 1024\n",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("limits.memory_budget"), "{e:#}");
        assert!(
            WorkerConfig::parse(
                "vip = \"192.0.2.1\"\nserver_id = 1\ncert = \"a\"\nkey = \"b\"\nbogus = 1"
            )
            .is_err()
        );
    }

    #[test]
    fn vips_list_every_address_and_vip_is_one_of_them() {
        let rest = "server_id = 3\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let c = WorkerConfig::parse(&format!(
            "vips = [\"192.0.2.10\", \"2001:db8::10\"]\n{rest}"
        ))
        .unwrap();
        let want: Vec<IpAddr> = vec![
            "192.0.2.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        ];
        assert_eq!(c.vips, want);
        assert_eq!(c.vip, None);
        let one = WorkerConfig::parse(&format!("vip = \"2001:db8::10\"\n{rest}")).unwrap();
        assert_eq!(one.vips, want[1..]);
        let err = |text: String| format!("{:#}", WorkerConfig::parse(&text).unwrap_err());
        let e = err(format!(
            "vip = \"192.0.2.10\"\nvips = [\"2001:db8::10\"]\n{rest}"
        ));
        assert!(e.contains("both"), "{e}");
        let e = err(rest.to_string());
        assert!(e.contains("no VIP"), "{e}");
        let e = err(format!("vips = []\n{rest}"));
        assert!(e.contains("no VIP"), "{e}");
        let e = err(format!("vips = [\"192.0.2.10\", \"::\"]\n{rest}"));
        assert!(e.contains("wildcard"), "{e}");
        let e = err(format!("vip = \"0.0.0.0\"\n{rest}"));
        assert!(e.contains("wildcard"), "{e}");
        let e = err(format!(
            "vips = [\"2001:db8::10\", \"2001:db8:0::10\"]\n{rest}"
        ));
        assert!(e.contains("twice"), "{e}");
        let e = err(format!(
            "vips = [\"192.0.2.10\", \"[2001:db8::10]:4433\"]\n{rest}"
        ));
        assert!(e.contains("vips") || e.contains("address"), "{e}");
    }

    #[test]
    fn migration_settings_need_secrets_and_a_peer_table() {
        let base = "vip = \"192.0.2.10\"\nserver_id = 3\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let full = format!(
            "{base}name = \"w3\"\ncontrol_socket = \"/run/baton/w3.sock\"\nsecrets = \"s.toml\"\n\
             [peer]\nlisten = \"10.0.0.13:4470\"\nca = \"ca.pem\"\ncert = \"w3.pem\"\nkey = \"w3.key\"\n\
             workers = [{{ name = \"w3\", server_id = 3, peer = \"10.0.0.13:4470\" }},\
             {{ name = \"w4\", server_id = 4, peer = \"10.0.0.14:4470\" }}]\n"
        );
        let c = WorkerConfig::parse(&full).unwrap();
        assert_eq!(c.name(), "w3");
        assert_eq!(c.peer.unwrap().listen.port(), 4470);
        let e = WorkerConfig::parse(&format!("{base}control_socket = \"/x.sock\"\n")).unwrap_err();
        assert!(e.to_string().contains("secrets"), "{e}");
        let unspecified = full.replace("10.0.0.13", "0.0.0.0");
        assert!(
            WorkerConfig::parse(&unspecified)
                .unwrap_err()
                .to_string()
                .contains("concrete")
        );
        // Only itself, or nobody, on the peer channel: refused, naming the key.
        let alone = full.replace(
            "{ name = \"w4\", server_id = 4, peer = \"10.0.0.14:4470\" }",
            "",
        );
        let e = format!("{:#}", WorkerConfig::parse(&alone).unwrap_err());
        assert!(e.contains("peer.workers"), "{e}");
        let twice = full.replace("name = \"w4\"", "name = \"w3\"");
        let e = format!("{:#}", WorkerConfig::parse(&twice).unwrap_err());
        assert!(e.contains("twice"), "{e}");
        let not_dns = full.replace("\"w4\"", "\"not a name\"");
        let e = format!("{:#}", WorkerConfig::parse(&not_dns).unwrap_err());
        assert!(e.contains("DNS"), "{e}");
        assert_eq!(WorkerConfig::parse(base).unwrap().name(), "worker-3");
        // The shipped example parses.
        WorkerConfig::parse(include_str!("../worker.example.toml")).unwrap();
    }

    #[test]
    fn control_tls_settings() {
        let base = "vip = \"192.0.2.10\"\nserver_id = 3\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
                    name = \"w3\"\ncontrol_socket = \"/run/baton/w3.sock\"\nsecrets = \"s.toml\"\n";
        let peer = "[peer]\nlisten = \"10.0.0.13:4470\"\nca = \"ca.pem\"\ncert = \"w3.pem\"\nkey = \"w3.key\"\n\
                    workers = [{ name = \"w4\", server_id = 4, peer = \"10.0.0.14:4470\" }]\n";
        let tls = "[control_tls]\nlisten = \"10.0.0.13:7400\"\nca = \"ca.pem\"\ncert = \"w3.pem\"\n\
                   key = \"w3.key\"\nclients = [\"baton-controller\"]\n";
        let c = WorkerConfig::parse(&format!("{base}{peer}{tls}")).unwrap();
        let t = c.control_tls.unwrap();
        assert_eq!(t.listen.port(), 7400);
        assert_eq!(t.clients, ["baton-controller"]);
        assert_eq!(t.max_clients, 16);
        let err = |text: String| format!("{:#}", WorkerConfig::parse(&text).unwrap_err());
        // It serves the control API, so it needs what the control socket needs.
        let e = err(format!(
            "{}{peer}{tls}",
            base.replace("control_socket = \"/run/baton/w3.sock\"\n", "")
        ));
        assert!(e.contains("control_socket"), "{e}");
        let e = err(format!(
            "{base}{peer}{}",
            tls.replace("[\"baton-controller\"]", "[]")
        ));
        assert!(e.contains("clients is empty"), "{e}");
        let e = err(format!(
            "{base}{peer}{}",
            tls.replace("baton-controller", "not a name")
        ));
        assert!(e.contains("not a DNS name"), "{e}");
        let e = err(format!("{base}{peer}{tls}max_clients = 0\n"));
        assert!(e.contains("max_clients"), "{e}");
        // Missing keys and unknown keys are refused.
        let e = err(format!(
            "{base}{peer}{}",
            tls.replace("clients = [\"baton-controller\"]\n", "")
        ));
        assert!(e.contains("clients"), "{e}");
        let e = err(format!("{base}{peer}{tls}client = [\"x\"]\n"));
        assert!(e.contains("unknown field"), "{e}");
        let e = err(format!(
            "{base}{peer}{}",
            tls.replace("10.0.0.13:7400", "10.0.0.13")
        ));
        assert!(e.contains("listen") || e.contains("socket address"), "{e}");
        WorkerConfig::parse(include_str!("../worker.example.toml")).unwrap();
    }

    #[test]
    fn decap_settings_are_checked() {
        let base = "vip = \"192.0.2.10\"\nserver_id = 3\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let c =
            WorkerConfig::parse(&format!("{base}[decap]\ngue_port = 6080\nipip = true\n")).unwrap();
        let d = c.decap.unwrap();
        assert_eq!((d.gue_port, d.ipip), (Some(6080), true));
        for (table, want) in [
            ("[decap]\n", "accepts nothing"),
            ("[decap]\ngue_port = 4433\n", "a port of its own"),
            ("[decap]\ngue_port = 0\n", "a port of its own"),
            ("[decap]\nfou = true\n", "unknown field"),
        ] {
            let e = format!(
                "{:#}",
                WorkerConfig::parse(&format!("{base}{table}")).unwrap_err()
            );
            assert!(e.contains(want), "{table}: {e}");
        }
    }

    #[test]
    fn a_cluster_worker_registers_the_encapsulation_its_decap_accepts() {
        let base = "vip = \"192.0.2.10\"\nserver_id = 3\ncert = \"c.pem\"\nkey = \"k.pem\"\nname = \"w3\"\n";
        let cluster = "[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"/baton/prod\"\naddress = \"10.0.7.13\"\n";
        let c = WorkerConfig::parse(&format!(
            "{base}{cluster}encap = \"gue\"\n[decap]\ngue_port = 6080\n"
        ))
        .unwrap();
        let got = c
            .cluster
            .as_ref()
            .unwrap()
            .record_encap(c.decap.as_ref())
            .unwrap();
        assert_eq!(got, Some(baton_cluster::RecordEncap::Gue { port: 6080 }));
        let c = WorkerConfig::parse(&format!("{base}{cluster}")).unwrap();
        assert_eq!(
            c.cluster.as_ref().unwrap().record_encap(None).unwrap(),
            None
        );
        for (extra, want) in [
            (
                "encap = \"gue\"\n[decap]\nipip = true\n",
                "needs [decap] gue_port",
            ),
            ("encap = \"ipip\"\n", "needs [decap] ipip = true"),
            ("encap = \"vxlan\"\n", "is not"),
        ] {
            let e = format!(
                "{:#}",
                WorkerConfig::parse(&format!("{base}{cluster}{extra}")).unwrap_err()
            );
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn cluster_settings_are_checked() {
        let base = "vip = \"192.0.2.10\"\nserver_id = 3\ncert = \"c.pem\"\nkey = \"k.pem\"\nname = \"w3\"\n";
        let cluster = "[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"/baton/prod\"\naddress = \"10.0.0.13\"\n";
        let c = WorkerConfig::parse(&format!("{base}{cluster}")).unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!((cl.lease_ttl_s, cl.weight), (10, 1));
        assert_eq!(cl.address.to_string(), "10.0.0.13");
        let err = |text: String| format!("{:#}", WorkerConfig::parse(&text).unwrap_err());
        let e = err(format!(
            "{base}{}",
            cluster.replace("\"http://127.0.0.1:2379\"", "")
        ));
        assert!(e.contains("cluster.endpoints"), "{e}");
        let e = err(format!("{base}{}", cluster.replace("/baton/prod", "baton")));
        assert!(e.contains("cluster.prefix"), "{e}");
        let e = err(format!("{base}{cluster}lease_ttl_s = 1\n"));
        assert!(e.contains("lease_ttl_s"), "{e}");
        let e = err(format!("{}{cluster}", base.replace("\"w3\"", "\"w 3\"")));
        assert!(e.contains("not a valid name"), "{e}");
    }
}
