//! A private cluster lab for one test ([`baton_lab::cluster`]): N real `baton-lb` cluster nodes
//! behind an ECMP router, a real etcd on the worker segment, the two workers registering
//! themselves, and a migration config for the client host that knows nothing but etcd and the
//! controller's credentials. Everything is torn down in `Drop`.
use super::*;
use baton_cluster::testing::{Etcd, NETNS_CLIENT_PORT};

pub const PREFIX: &str = "/baton/lab";
/// The workers' control API (mutual TLS) on their segment address.
pub const CONTROL_PORT: u16 = 4480;

/// One LB node: its namespace, pins, socket and `baton-lb` process.
pub struct LbNode {
    pub name: String,
    pub ns: String,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl LbNode {
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(bin_dir().join("baton-lb"))
                .args(["--netns", &self.ns, "--config"])
                .arg(&self.config)
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                .env("BATON_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn baton-lb"),
        );
        let start = Instant::now();
        while self.status().is_none() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited early ({st}):\n{}", self.name, self.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} not ready in 30 s:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the process dies; the XDP program stays attached (pinned).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `status` through the control socket (None if it does not answer).
    pub fn status(&self) -> Option<Value> {
        use std::io::{BufRead, BufReader, Write};
        let s = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        (&s).write_all(b"{\"cmd\":\"status\"}\n").ok()?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).ok()?;
        let v: Value = serde_json::from_str(&line).ok()?;
        (v["ok"] == true).then(|| v["data"].clone())
    }

    /// (applied revision, watching, workers it routes new connections to).
    pub fn state(&self) -> (i64, bool, Vec<String>) {
        node_state(&self.status().unwrap_or(Value::Null))
    }

    /// The data plane's counters (from the pins: also after the process died).
    pub fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        lb_counters(&self.pin_dir, &self.socket)
    }

    /// The Maglev table as worker names (slots are node-local; names are the cluster's).
    pub fn maglev_by_name(&self) -> Vec<String> {
        let status = self.status().expect("node answers");
        let names: std::collections::HashMap<u64, String> = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["index"].as_u64().unwrap(),
                    w["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let maps = lb_user::pinned::PinnedMaps::open(&self.pin_dir).expect("open the pins");
        (0..maps.maglev.len())
            .map(|i| {
                let slot = maps.maglev.get(&i, 0).unwrap_or(u32::MAX);
                names
                    .get(&(slot as u64))
                    .cloned()
                    .unwrap_or_else(|| format!("slot {slot}"))
            })
            .collect()
    }

    /// The CIDs of the node's override map.
    pub fn overrides(&self) -> std::collections::BTreeSet<String> {
        let maps = lb_user::pinned::PinnedMaps::open(&self.pin_dir).expect("open the pins");
        maps.overrides()
            .unwrap()
            .iter()
            .map(|(k, _)| lb_common::hex(k.as_slice()))
            .collect()
    }
}

impl Drop for LbNode {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ----\n{}",
                self.name,
                tail(&self.log_text(), 60)
            );
        }
        let _ = remove_pins(&self.pin_dir);
        for f in [&self.socket, &self.config, &self.log] {
            let _ = std::fs::remove_file(f);
        }
    }
}

pub struct ClusterLab {
    // Dropped in this order: workers, nodes (pins), etcd, then the namespaces.
    workers: Vec<Child>,
    pub nodes: Vec<LbNode>,
    pub etcd: Etcd,
    pub dir: PathBuf,
    /// The migration config of the client host (etcd and the workers' control API only).
    pub migration_config: PathBuf,
    pub net: baton_lab::cluster::ClusterNetns,
}

impl ClusterLab {
    /// The lab with `lb_nodes` nodes, etcd, and both workers registered and routed to by every
    /// node.
    pub fn up(lb_nodes: usize) -> ClusterLab {
        assert!(unsafe { libc::geteuid() } == 0, "the netns tests need root");
        sweep_leftovers();
        let _ = bin_dir();
        let pid = std::process::id();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let topology = baton_lab::cluster::ClusterTopology::new(
            &format!("btt{pid}x{n}"),
            lb_nodes,
            baton_lab::PRIVATE,
        )
        .unwrap();
        let net =
            baton_lab::cluster::ClusterNetns::up(topology).unwrap_or_else(|e| panic!("lab: {e:#}"));
        let etcd = Etcd::start_in_netns(&format!("cluster-{n}"), &net.etcd);
        let endpoint = format!("http://{}:{NETNS_CLIENT_PORT}", net.etcd_addr());
        let dir = std::env::temp_dir().join(format!("baton-cluster-{pid}-{n}"));
        let peers = [0, 1].map(|i| format!("{}:{PEER_PORT}", net.worker_addr4(i)));
        write_worker_configs_at(&dir, &peers, None);
        let endpoints = [0, 1].map(|_| endpoint.clone());
        let migration_config = cluster_member_configs(
            &dir,
            &endpoints,
            &[0, 1].map(|i| net.worker_addr4(i)),
            &endpoint,
        );
        let nodes = (0..lb_nodes)
            .map(|k| {
                let name = format!("lb{}", k + 1);
                let file = |ext: &str| {
                    std::env::temp_dir().join(format!("baton-test-{pid}-{n}-{name}.{ext}"))
                };
                let node = LbNode {
                    ns: net.lbs[k].clone(),
                    pin_dir: PathBuf::from(format!("/sys/fs/bpf/baton-test-{pid}-{n}-{name}")),
                    socket: file("sock"),
                    config: file("toml"),
                    log: file("log"),
                    child: None,
                    name,
                };
                std::fs::write(
                    &node.config,
                    format!(
                        r#"interface = "{uplink}"
# Generic mode: the segment's far ends are bridge ports (native redirects into veth need care).
xdp_mode = "skb"
[cid]
length = {CID_LEN}
server_id_length = 2
[[vips]]
address = "{VIP4}"
ports = [{PORT}]
[health]
kind = "none"
[control]
socket = "{socket}"
metrics = "127.0.0.1:{METRICS_PORT}"
[cluster]
endpoints = ["{endpoint}"]
prefix = "{PREFIX}"
node = "{name}"
lease_ttl_s = 4
"#,
                        uplink = net.lb_uplink_dev(k),
                        socket = node.socket.display(),
                        name = node.name,
                    ),
                )
                .unwrap();
                node
            })
            .collect();
        let mut lab = ClusterLab {
            workers: Vec::new(),
            nodes,
            etcd,
            dir,
            migration_config,
            net,
        };
        for node in &mut lab.nodes {
            node.start();
        }
        for i in 0..2 {
            let child = spawn_worker_in(&lab.net.workers[i], &lab.dir, i, &[]);
            lab.workers.push(child);
        }
        for node in &lab.nodes {
            wait_for(
                &format!("{} to route to both registered workers", node.name),
                || node.state().2.len() == 2,
                || format!("{:?}\n{}", node.state(), tail(&node.log_text(), 20)),
            );
        }
        lab
    }

    /// `baton --migration-config <client config> --json ARGS` on the client host.
    pub fn baton(&self, args: &[&str]) -> Output {
        baton_in(&self.net.client, &self.migration_config, args)
    }

    /// [`Self::baton`], which must succeed; its JSON answer.
    pub fn baton_json(&self, args: &[&str]) -> Value {
        json_of(&self.baton(args), &format!("baton {args:?}"))
    }

    /// The CIDs etcd holds overrides for.
    pub fn etcd_overrides(&self) -> std::collections::BTreeSet<String> {
        etcd_overrides(&self.etcd)
    }

    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(VIP4.parse().unwrap(), PORT)
    }

    /// IPv4 datagrams each node's program saw to the VIP.
    pub fn vip_packets(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| n.counters().get("ipv4").copied().unwrap_or(0))
            .collect()
    }

    /// Drains `worker` from the client host: every connection it held moved, none failed.
    pub fn drain(&self, worker: &str) -> Value {
        let s = self.baton_json(&["drain", worker]);
        assert_eq!(s["failed"], 0, "drain {worker}: {s}");
        assert!(
            s["moved"].as_u64() > Some(0),
            "drain {worker} moved connections: {s}"
        );
        s
    }

    /// The worker holding the most connections now, and how many it holds.
    pub fn busiest_worker(&self) -> (String, usize) {
        let conns = self.baton_json(&["conns"]);
        let mut by_worker = std::collections::BTreeMap::<String, usize>::new();
        for r in conns.as_array().unwrap() {
            *by_worker
                .entry(r["worker"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
        by_worker
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .expect("the workers hold connections")
    }

    /// Every node's maps agree with etcd: the same overrides, the same Maglev table by name.
    pub fn nodes_agree(&self, when: &str) {
        let want = self.etcd_overrides();
        let tables: Vec<Vec<String>> = self.nodes.iter().map(|n| n.maglev_by_name()).collect();
        for (k, node) in self.nodes.iter().enumerate() {
            wait_for(
                &format!("{}'s overrides to be etcd's {when}", node.name),
                || node.overrides() == self.etcd_overrides(),
                || format!("etcd {want:?}, {} {:?}", node.name, node.overrides()),
            );
            assert_eq!(
                tables[k], tables[0],
                "{when}: {} builds the Maglev table lb1 builds",
                node.name
            );
        }
    }
}

/// Waits until every connection of `load` answered 5 more requests.
pub fn carry_on(load: &Load, when: &str) {
    let from = load.requests_per_connection();
    wait_for(
        &format!("every connection to answer 5 more requests {when}"),
        || {
            let now = load.requests_per_connection();
            now.iter().zip(&from).all(|(n, f)| *n >= f + 5)
        },
        || format!("{from:?} -> {:?}", load.requests_per_connection()),
    );
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        for c in &mut self.workers {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for i in 0..2 {
                let log = std::fs::read_to_string(self.dir.join(format!("w{}.log", i + 1)))
                    .unwrap_or_default();
                eprintln!("---- w{} log ----\n{}", i + 1, tail(&log, 40));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a cluster test's load must come to: every connection established, no failed request,
/// reconnect, connection error or counter break, every long stream byte-exact.
pub fn assert_load_clean(summary: &Value, connections: usize) {
    let n = |k: &str| summary[k].as_u64().unwrap_or(u64::MAX);
    assert_eq!(n("established"), connections as u64, "{summary}");
    assert_eq!(n("failed"), 0, "failed requests: {summary}");
    assert_eq!(n("reconnects"), 0, "reconnects: {summary}");
    assert_eq!(n("connection_errors"), 0, "{summary}");
    assert_eq!(n("counter_breaks"), 0, "{summary}");
    assert_eq!(n("streams_not_exact"), 0, "streams not exact: {summary}");
    assert!(n("stream_bytes_sent") > 0, "{summary}");
    assert_eq!(
        n("stream_bytes_verified"),
        n("stream_bytes_sent"),
        "{summary}"
    );
    assert_eq!(summary["ok"], true, "{summary}");
}

/// Makes the two workers of the configs in `dir` (`write_worker_configs*`) cluster members:
/// `[cluster]` with etcd at `endpoints[i]` and their `addresses[i]`, and `[control_tls]` on that
/// address. Writes the migration config of a host that knows nothing but etcd (at
/// `driver_endpoint`) and the controller's credentials, and returns its path.
pub fn cluster_member_configs(
    dir: &Path,
    endpoints: &[String; 2],
    addresses: &[String; 2],
    driver_endpoint: &str,
) -> PathBuf {
    let d = dir.display();
    for i in 0..2 {
        let path = dir.join(format!("w{}.toml", i + 1));
        let mut text = std::fs::read_to_string(&path).unwrap();
        let (endpoint, addr) = (&endpoints[i], &addresses[i]);
        text += &format!(
            "[cluster]\nendpoints = [\"{endpoint}\"]\nprefix = \"{PREFIX}\"\naddress = \"{addr}\"\n\
             [control_tls]\nlisten = \"{addr}:{CONTROL_PORT}\"\nca = \"{d}/ca.pem\"\n\
             cert = \"{d}/w{k}.pem\"\nkey = \"{d}/w{k}.key\"\nclients = [\"baton-controller\"]\n",
            k = i + 1
        );
        std::fs::write(&path, text).unwrap();
    }
    let migration_config = dir.join("cluster-migration.toml");
    std::fs::write(
        &migration_config,
        format!(
            "secrets = \"{d}/controller-secrets.toml\"\n\
             [control_tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/controller.pem\"\nkey = \"{d}/controller.key\"\n\
             [cluster]\nendpoints = [\"{driver_endpoint}\"]\nprefix = \"{PREFIX}\"\napplied_timeout_ms = 10000\n"
        ),
    )
    .unwrap();
    migration_config
}

/// `baton --migration-config <mc> --json ARGS`, run in namespace `ns` (a host with no pins and
/// no socket of a node).
pub fn baton_in(ns: &str, mc: &Path, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin_dir().join("baton"))
        .arg("--migration-config")
        .arg(mc)
        .arg("--json")
        .args(args)
        .output()
        .expect("run baton")
}

/// The JSON answer of a `baton --json` run that must have succeeded.
pub fn json_of(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A node's `status` as (applied revision, watching, workers it routes new connections to).
pub fn node_state(status: &Value) -> (i64, bool, Vec<String>) {
    let workers = status["workers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|w| w["healthy"] == true && w["maglev_slots"].as_u64() > Some(0))
                .filter_map(|w| w["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    (
        status["cluster"]["applied_revision"].as_i64().unwrap_or(0),
        status["cluster"]["watching"] == true,
        workers,
    )
}

/// The keys `etcd` holds under `[PREFIX]/dir/`, without that start.
pub fn etcd_keys(etcd: &Etcd, dir: &str) -> std::collections::BTreeSet<String> {
    let start = format!("{PREFIX}/{dir}/");
    etcd.ctl(&["get", "--prefix", "--keys-only", &start])
        .lines()
        .filter_map(|l| l.strip_prefix(start.as_str()))
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// The CIDs `etcd` holds overrides for (under [`PREFIX`]).
pub fn etcd_overrides(etcd: &Etcd) -> std::collections::BTreeSet<String> {
    etcd_keys(etcd, "overrides")
}

/// The health records in `etcd`: "<node>/<worker>" -> healthy.
pub fn etcd_health(etcd: &Etcd) -> std::collections::BTreeMap<String, bool> {
    let dir = format!("{PREFIX}/health/");
    let out = etcd.ctl(&["get", "--prefix", &dir]);
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    lines
        .chunks(2)
        .filter_map(|kv| {
            let key = kv[0].strip_prefix(&dir)?.to_string();
            let v: Value = serde_json::from_str(kv.get(1)?).ok()?;
            Some((key, v["healthy"] == true))
        })
        .collect()
}
