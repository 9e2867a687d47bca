//! A private copy of the lab for one test: uniquely named namespaces (`btt<pid>x<n>-*`), its own
//! pin directory and control socket, and the real `baton-lb` / `baton` binaries. Everything is
//! torn down in `Drop`, also when the test fails.
#![allow(dead_code)]

pub mod cluster;
pub mod demo;

use serde_json::Value;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const VIP4: &str = baton_lab::PRIVATE.vip4;
pub const VIP6: &str = baton_lab::PRIVATE.vip6;
pub const PORT: u16 = 4433;
pub const CID_LEN: usize = 8;
/// Prometheus port of baton-lb, inside the test's LB namespace (so tests never collide on it).
pub const METRICS_PORT: u16 = 9650;

/// How long a wait for something a test expects may take before the test gives up: far more
/// than any of them needs, so that only a real failure (not a loaded machine) ends one.
pub const PATIENCE: Duration = Duration::from_secs(30);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Polls `done` every 20 ms until it holds; after [`PATIENCE`] panics with what was awaited and
/// the state `show` describes.
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool, show: impl Fn() -> String) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < PATIENCE,
            "gave up after {} s waiting for {what}; state: {}",
            PATIENCE.as_secs(),
            show()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `baton-worker gen-certs --workers <workers> <extra> --out <out>`: the CA, service and worker
/// certificates and the secrets files.
pub fn gen_certs(out: &Path, workers: &str, extra: &[&str]) {
    let o = Command::new(worker_bin())
        .args(["gen-certs", "--workers", workers])
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "gen-certs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds `baton-lb` and `baton` (once per test process) into the target directory this test
/// binary was built in, so a fresh clone needs nothing but `cargo test`.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // <target>/<profile>/deps/<test>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let mut cmd = Command::new(env!("CARGO"));
        // With the fault-test hooks (hidden `baton migrate` flags); release builds leave them out.
        cmd.args([
            "build",
            "-q",
            "-p",
            "lb-user",
            "-p",
            "baton-cli",
            "--bins",
            "--features",
            "baton-cli/test-hooks",
        ])
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", &target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd
            .output()
            .expect("run cargo build for the baton binaries");
        assert!(
            out.status.success(),
            "building baton-lb/baton failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir
    })
}

/// Builds `baton-worker` (once per test process) next to the baton binaries; returns its path.
pub fn worker_bin() -> PathBuf {
    package_bin("baton-worker").join("baton-worker")
}

/// `baton-upstream`, the real HTTP/1.1 and h2c server behind the HTTP/3 proxy (tests/upstream).
pub fn upstream_bin() -> PathBuf {
    package_bin("baton-test-upstream").join("baton-upstream")
}

/// `baton-path`, the emulated-path UDP relay for clients that are not ours (loadgen).
pub fn path_relay_bin() -> PathBuf {
    package_bin("baton-load").join("baton-path")
}

/// `h3-load`, the HTTP/3 load client on crates.io quinn and h3 without our patches
/// (interop/h3-stock, its own workspace), built once per test process into `<target>/h3-stock`.
pub fn h3_load_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = bin_dir().parent().expect("target dir").join("h3-stock");
        let out = Command::new(env!("CARGO"))
            .args(["build", "-q", "--release", "--manifest-path"])
            .arg(workspace_root().join("interop/h3-stock/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .output()
            .expect("run cargo build for interop/h3-stock");
        assert!(
            out.status.success(),
            "building interop/h3-stock failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("release").join("h3-load")
    })
    .clone()
}

/// Builds package `package`'s binaries (once per test process, with the test's profile) next to
/// the baton binaries; returns the directory they are in.
fn package_bin(package: &'static str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(&str, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(n, _)| *n == package) {
        return p.clone();
    }
    let dir = bin_dir();
    let target_dir = dir.parent().expect("target dir").to_path_buf();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-q", "-p", package, "--bins"])
        .args(match package {
            "baton-worker" => &["--features", "test-hooks"][..],
            _ => &[],
        })
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", &target_dir);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run cargo build for {package}: {e}"));
    assert!(
        out.status.success(),
        "building {package} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    built.push((package, dir.to_path_buf()));
    dir.to_path_buf()
}

/// The worker-to-worker channel's port (on each worker's lab address).
pub const PEER_PORT: u16 = 4470;

/// Makes the certificates and secrets (`baton-worker gen-certs`) and the configs of workers w1
/// and w2 (serving both VIPs, IPv4 and IPv6) for the lab's worker namespaces in `dir` (made
/// afresh); returns the migration config
/// for the `baton` CLI (`<dir>/migration.toml`). Worker i's config is `<dir>/w<i>.toml`, its
/// control socket `<dir>/w<i>.sock`.
pub fn write_worker_configs(dir: &Path) -> PathBuf {
    write_worker_configs_with(dir, false)
}

/// [`write_worker_configs`], with the worker-to-worker channel on the workers' IPv6 lab addresses
/// (`[fd00:201:1<i>::2]:4470`, see `baton_lab::PRIVATE`) if `peer_v6`.
pub fn write_worker_configs_with(dir: &Path, peer_v6: bool) -> PathBuf {
    write_worker_configs_for(dir, peer_v6, None)
}

/// [`write_worker_configs_with`], the workers serving the HTTP/3 proxy (`service = "proxy"`) with
/// these `[proxy]` tables if `proxy` is given, else the demo.
pub fn write_worker_configs_for(dir: &Path, peer_v6: bool, proxy: Option<&str>) -> PathBuf {
    // Every private lab has the same addresses (only the namespace names differ).
    let net = baton_lab::Topology::private("");
    let peers = [0, 1].map(|i| {
        if peer_v6 {
            format!("[{}]:{PEER_PORT}", net.worker_addr6(i))
        } else {
            format!("{}:{PEER_PORT}", net.worker_addr4(i))
        }
    });
    write_worker_configs_at(dir, &peers, proxy)
}

/// [`write_worker_configs_for`] with the workers' peer channels at `peers` (w1's, w2's).
pub fn write_worker_configs_at(dir: &Path, peers: &[String; 2], proxy: Option<&str>) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    gen_certs(dir, "w1,w2", &["--service-name", "baton.test"]);
    let d = dir.display();
    // The controller gets the token secret only (no snapshot key).
    let mut mc = format!("secrets = \"{d}/controller-secrets.toml\"\n");
    let peer_of = |sid: u32| peers[sid as usize - 1].clone();
    // Every worker lists both (the same list everywhere): only they are admitted as peers.
    let workers = (1..=2)
        .map(|sid| {
            format!(
                "{{ name = \"w{sid}\", server_id = {sid}, peer = \"{}\" }}",
                peer_of(sid)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    for sid in 1..=2 {
        let name = format!("w{sid}");
        let peer = peer_of(sid);
        let service = if proxy.is_some() { "proxy" } else { "demo" };
        let tables = proxy.unwrap_or_default();
        let cfg = format!(
            r#"vips = ["{VIP4}", "{VIP6}"]
service = "{service}"
port = {PORT}
server_id = {sid}
cid_len = {CID_LEN}
server_id_len = 2
cert = "{d}/service.pem"
key = "{d}/service.key"
name = "{name}"
control_socket = "{d}/{name}.sock"
secrets = "{d}/secrets.toml"
[peer]
listen = "{peer}"
ca = "{d}/ca.pem"
cert = "{d}/{name}.pem"
key = "{d}/{name}.key"
workers = [{workers}]
{tables}
"#
        );
        std::fs::write(dir.join(format!("{name}.toml")), cfg).unwrap();
        mc += &format!("[[workers]]\nname = \"{name}\"\ncontrol = \"{d}/{name}.sock\"\n");
    }
    let migration_config = dir.join("migration.toml");
    std::fs::write(&migration_config, mc).unwrap();
    migration_config
}

/// One JSON-lines request on a worker's control socket; None if it does not answer in 5 s.
pub fn worker_call(sock: &Path, req: &str) -> Option<Value> {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    (&s).write_all(format!("{req}\n").as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

/// Starts lab worker `i` (w1 or w2, configured by [`write_worker_configs`] in `dir`) in its
/// namespace with `env`, logging to `<dir>/w<i>.log`; returns once its control socket answers.
pub fn spawn_worker(lab: &Lab, dir: &Path, i: usize, env: &[(&str, &str)]) -> Child {
    spawn_worker_in(&lab.workers[i], dir, i, env)
}

/// [`spawn_worker`] in namespace `ns`.
pub fn spawn_worker_in(ns: &str, dir: &Path, i: usize, env: &[(&str, &str)]) -> Child {
    let name = format!("w{}", i + 1);
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(worker_bin())
        .arg("--config")
        .arg(dir.join(format!("{name}.toml")))
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let start = Instant::now();
    while worker_call(&sock, r#"{"cmd":"info"}"#).is_none_or(|v| v["ok"] != true) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "worker {name} not up:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Runs a command; panics with its stderr if it fails.
pub fn sh(args: &[&str]) -> Output {
    baton_lab::sh(args).unwrap_or_else(|e| panic!("{e:#}"))
}

#[allow(unused_imports)] // not every test file uses it
pub use baton_lab::in_netns;

/// Removes namespaces and pin directories left by earlier test processes that died without
/// cleaning up (their pid is gone).
fn sweep_leftovers() {
    baton_lab::sweep_namespaces("btt", 'x');
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if baton_lab::owner_is_dead(&name, "baton-test-", '-') {
                let _ = remove_pins(&e.path());
            }
        }
    }
}

fn remove_pins(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    std::fs::remove_dir(dir)
}

pub struct Lab {
    pub client: String,
    pub lb: String,
    pub workers: [String; 2],
    /// The namespaces (the `baton-lab` topology); removed when the lab is dropped, after the
    /// pins (the XDP link goes with them).
    pub net: baton_lab::Netns,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    daemon: Option<Child>,
}

pub struct LabOptions {
    pub xdp_mode: &'static str,
    /// The `[health]` table body.
    pub health: String,
    /// The `[cluster]` table body: baton-lb as a cluster node, its workers from etcd (the
    /// config then lists none).
    pub cluster: Option<String>,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            xdp_mode: "native",
            health: "kind = \"none\"".into(),
            cluster: None,
        }
    }
}

impl Lab {
    pub fn new(opts: LabOptions) -> Lab {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the netns tests need root (namespaces, XDP, bpffs)"
        );
        sweep_leftovers();
        let _ = bin_dir();
        let pid = std::process::id();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let topology = baton_lab::Topology::private(&format!("btt{pid}x{n}"));
        let net = baton_lab::Netns::up(topology).unwrap_or_else(|e| panic!("lab: {e:#}"));
        net.wait_for_gateway(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let lab = Lab {
            client: net.client.clone(),
            lb: net.lb.clone(),
            workers: net.workers.clone(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/baton-test-{pid}-{n}")),
            socket: std::env::temp_dir().join(format!("baton-test-{pid}-{n}.sock")),
            config: std::env::temp_dir().join(format!("baton-test-{pid}-{n}.toml")),
            log: std::env::temp_dir().join(format!("baton-test-{pid}-{n}.log")),
            daemon: None,
            net,
        };
        let config = format!(
            r#"
interface = "{lb_cl}"
xdp_mode = "{mode}"
[cid]
length = {CID_LEN}
server_id_length = 2
[[vips]]
address = "{VIP4}"
ports = [{PORT}]
[[vips]]
address = "{VIP6}"
ports = [{PORT}]
{workers}[health]
{health}
[control]
socket = "{socket}"
metrics = "127.0.0.1:{METRICS_PORT}"
"#,
            lb_cl = lab.net.lb_client_dev(),
            workers = match &opts.cluster {
                Some(table) => format!("[cluster]\n{table}\n"),
                None => format!(
                    r#"[[workers]]
name = "w1"
server_id = 1
address = "{w1}"
mac = "auto"
interface = "{lb_w1}"
[[workers]]
name = "w2"
server_id = 2
address = "{w2}"
mac = "auto"
"#,
                    lb_w1 = lab.net.lb_worker_dev(0),
                    w1 = lab.net.worker_addr4(0),
                    w2 = lab.net.worker_addr4(1),
                ),
            },
            mode = opts.xdp_mode,
            health = opts.health,
            socket = lab.socket.display()
        );
        std::fs::write(&lab.config, config).unwrap();
        lab
    }

    /// Starts baton-lb in the LB namespace and waits until its control socket answers.
    pub fn start_lb(&mut self) {
        assert!(self.daemon.is_none(), "baton-lb already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin_dir().join("baton-lb"))
            .args(["--netns", &self.lb, "--config"])
            .arg(&self.config)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .env("BATON_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn baton-lb");
        self.daemon = Some(child);
        let start = Instant::now();
        loop {
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("baton-lb exited early ({status}):\n{}", self.log_text());
            }
            if self.status_via_socket().is_some() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "baton-lb not ready in 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs baton-lb for this lab's namespace and config, but with another pin directory, and
    /// returns how it ended (for tests of refusals; it must not keep running).
    pub fn run_lb_with_pin_dir(&self, pin_dir: &Path) -> Output {
        let mut child = Command::new(bin_dir().join("baton-lb"))
            .args(["--netns", &self.lb, "--config"])
            .arg(&self.config)
            .arg("--pin-dir")
            .arg(pin_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn baton-lb");
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("baton-lb kept running although it should have refused to start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    /// `baton-lb detach` for this lab; waits for the daemon (if any) to exit.
    pub fn detach(&mut self) -> Output {
        let out = Command::new(bin_dir().join("baton-lb"))
            .arg("detach")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--control-socket")
            .arg(&self.socket)
            .output()
            .expect("run baton-lb detach");
        if let Some(mut child) = self.daemon.take() {
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "baton-lb should exit cleanly when asked to by detach: {status}"
            );
        }
        out
    }

    /// Sends `signal` to the running baton-lb.
    pub fn signal_lb(&self, signal: i32) {
        let child = self.daemon.as_ref().expect("baton-lb not running");
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    /// Sends `signal` to baton-lb and waits for it to exit.
    pub fn stop_lb(&mut self, signal: i32) {
        let mut child = self.daemon.take().expect("baton-lb not running");
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let _ = child.wait();
    }

    pub fn status_via_socket(&self) -> Option<Value> {
        use std::io::{BufRead, BufReader, Write};
        let s = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        (&s).write_all(b"{\"cmd\":\"status\"}\n").ok()?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).ok()?;
        let v: Value = serde_json::from_str(&line).ok()?;
        v["ok"]
            .as_bool()
            .filter(|ok| *ok)
            .map(|_| v["data"].clone())
    }

    /// GET /metrics from baton-lb, from inside the LB namespace.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        in_netns(&self.lb, || {
            let mut s =
                std::net::TcpStream::connect(("127.0.0.1", METRICS_PORT)).expect("metrics port");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
    }

    /// Rewrites the config file baton-lb reads on its next start.
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, f(text)).unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the `baton` CLI against this lab; returns stdout, panics with stderr on failure.
    pub fn baton(&self, args: &[&str]) -> String {
        let out = self.baton_raw(args);
        assert!(
            out.status.success(),
            "baton {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn baton_raw(&self, args: &[&str]) -> Output {
        Command::new(bin_dir().join("baton"))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--control-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run baton")
    }

    /// `baton --migration-config <config> --json ARGS` (the migration commands, e.g. `migrate`,
    /// `drain`, `conns`), unparsed.
    pub fn baton_migration(&self, migration_config: &Path, args: &[&str]) -> Output {
        let mut a = vec![
            "--migration-config",
            migration_config.to_str().expect("a UTF-8 path"),
            "--json",
        ];
        a.extend_from_slice(args);
        self.baton_raw(&a)
    }

    /// Every connection the workers of `migration_config` list (`baton conns`).
    pub fn conns(&self, migration_config: &Path) -> Vec<Value> {
        let out = self.baton_migration(migration_config, &["conns"]);
        assert!(
            out.status.success(),
            "baton conns: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn baton_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.baton(&a)).expect("baton --json prints JSON")
    }

    /// A UDP socket in the client namespace.
    pub fn client_socket(&self, v6: bool) -> UdpSocket {
        in_netns(&self.client, move || {
            let s = UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" }).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
            s
        })
    }

    /// Starts receivers on the VIP (IPv4 and IPv6) in both worker namespaces.
    pub fn receivers(&self) -> Receivers {
        let stop = Arc::new(AtomicBool::new(false));
        let got: [Arc<Mutex<Vec<Vec<u8>>>>; 2] = Default::default();
        let mut threads = Vec::new();
        for (i, ns) in self.workers.iter().enumerate() {
            for addr in [VIP4, VIP6] {
                let sock = in_netns(ns, move || {
                    let s = UdpSocket::bind(SocketAddr::new(addr.parse::<IpAddr>().unwrap(), PORT))
                        .unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                    s
                });
                let (stop, got) = (stop.clone(), got[i].clone());
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(n) = sock.recv(&mut buf) {
                            got.lock().unwrap().push(buf[..n].to_vec());
                        }
                    }
                    // Drain what is still queued or in flight: until a quarter second passes
                    // without a datagram (a loaded host delivers late, not never).
                    sock.set_read_timeout(Some(Duration::from_millis(250)))
                        .unwrap();
                    while let Ok(n) = sock.recv(&mut buf) {
                        got.lock().unwrap().push(buf[..n].to_vec());
                    }
                }));
            }
        }
        Receivers { stop, got, threads }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- baton-lb log ----\n{}", self.log_text());
        }
        // Pins first (the link goes with them), then the files; the namespaces go when `net`
        // is dropped, after this.
        let _ = remove_pins(&self.pin_dir);
        for f in [&self.socket, &self.config, &self.log] {
            let _ = std::fs::remove_file(f);
        }
    }
}

pub struct Receivers {
    stop: Arc<AtomicBool>,
    got: [Arc<Mutex<Vec<Vec<u8>>>>; 2],
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Receivers {
    /// Stops the receivers (after letting in-flight packets land) and returns what each worker got.
    pub fn finish(self) -> [Vec<Vec<u8>>; 2] {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.got.map(|g| std::mem::take(&mut *g.lock().unwrap()))
    }

    /// What has arrived so far, without stopping.
    pub fn snapshot(&self) -> [Vec<Vec<u8>>; 2] {
        [
            self.got[0].lock().unwrap().clone(),
            self.got[1].lock().unwrap().clone(),
        ]
    }
}

/// A server-issued CID in the lb-common layout (config rotation 0).
pub fn server_cid(server_id: u16, nonce: u32) -> Vec<u8> {
    let layout = lb_common::CidLayout::new(CID_LEN as u8, 2).unwrap();
    let mut cid = vec![0u8; CID_LEN];
    let n = nonce.to_be_bytes();
    layout
        .encode(
            0,
            server_id as u64,
            &[n[0], n[1], n[2], n[3], 0x5a],
            &mut cid,
        )
        .unwrap();
    cid
}

/// A 1-RTT (short header) packet: fixed bit set, DCID, then a tag and sequence number we check.
pub fn short_packet(cid: &[u8], seq: u32) -> Vec<u8> {
    let mut p = vec![0x40 | 0x01];
    p.extend_from_slice(cid);
    p.extend_from_slice(b"BTST");
    p.extend_from_slice(&seq.to_be_bytes());
    p.resize(64, 0xee);
    p
}

/// A QUIC v1 Initial with a client-chosen DCID, padded to 1200 bytes as clients must.
pub fn initial_packet(dcid: &[u8], seq: u32) -> Vec<u8> {
    let mut p = vec![0xc0 | 0x03];
    p.extend_from_slice(&1u32.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.push(8);
    p.extend_from_slice(&[0xc1; 8]);
    p.push(0); // token length
    p.extend_from_slice(&[0x44, 0xa0]); // length (varint, 1184)
    p.extend_from_slice(b"BTST");
    p.extend_from_slice(&seq.to_be_bytes());
    p.resize(1200, 0);
    p
}

/// The DCID the worker saw (short header: configured length).
pub fn dcid_of(pkt: &[u8]) -> Vec<u8> {
    if pkt[0] & 0x80 == 0 {
        pkt[1..1 + CID_LEN].to_vec()
    } else {
        let l = pkt[5] as usize;
        pkt[6..6 + l].to_vec()
    }
}

#[allow(unused_imports)] // not every test file uses it
pub use lb_common::hex;

pub fn vip(v6: bool) -> SocketAddr {
    SocketAddr::new(
        if v6 {
            VIP6.parse().unwrap()
        } else {
            VIP4.parse().unwrap()
        },
        PORT,
    )
}

// ---- Helpers added for tests/resilience_netns.rs (appended; the ones above are unchanged). ----

/// Builds `baton-load` (once per test process) next to the baton binaries; returns its path.
pub fn load_bin() -> PathBuf {
    package_bin("baton-load").join("baton-load")
}

/// The data plane's counters (summed over CPUs) read by `baton --json status` from the pinned
/// maps: works whether or not baton-lb is running.
pub fn lb_counters(pin_dir: &Path, socket: &Path) -> std::collections::BTreeMap<String, u64> {
    let out = Command::new(bin_dir().join("baton"))
        .arg("--pin-dir")
        .arg(pin_dir)
        .arg("--control-socket")
        .arg(socket)
        .args(["--json", "status"])
        .output()
        .expect("run baton status");
    assert!(
        out.status.success(),
        "baton status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("baton --json status prints JSON");
    v["counters"]
        .as_object()
        .unwrap_or_else(|| panic!("no counters in baton status: {v}"))
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
        .collect()
}

/// The last `n` lines of `text` (for failure messages).
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---- baton-load as a helper of its own (IPv6 and IPv4 clients through migrations). ----

/// A running `baton-load` in the lab's client namespace, writing its output, summary and gap log
/// (one line per completed request) into `dir` as `<name>.out`, `<name>-summary.json` and
/// `<name>-gaps.log` (stop file `<name>.stop`). Killed on drop if still running.
pub struct Load {
    child: Option<Child>,
    dir: PathBuf,
    name: String,
    pub connections: usize,
}

impl Load {
    /// Starts `connections` connections to `target` (IPv4 or IPv6), a request every 10 ms and a
    /// long byte-checked stream on each, trusting `<dir>/ca.pem`; returns once every connection is
    /// up (its `ready` line), or panics after `patience` with its output.
    pub fn start(
        lab: &Lab,
        dir: &Path,
        name: &str,
        target: SocketAddr,
        connections: usize,
        patience: Duration,
    ) -> Load {
        Load::start_with(lab, dir, name, &[target], connections, &[], patience)
    }

    /// [`Load::start`] with several targets (baton-load alternates its connections between them)
    /// and `extra` baton-load arguments (e.g. `--rebind-every 300ms`).
    pub fn start_with(
        lab: &Lab,
        dir: &Path,
        name: &str,
        targets: &[SocketAddr],
        connections: usize,
        extra: &[&str],
        patience: Duration,
    ) -> Load {
        Load::start_in(
            &lab.client,
            dir,
            name,
            targets,
            connections,
            extra,
            patience,
        )
    }

    /// [`Load::start_with`] from namespace `client_ns`.
    pub fn start_in(
        client_ns: &str,
        dir: &Path,
        name: &str,
        targets: &[SocketAddr],
        connections: usize,
        extra: &[&str],
        patience: Duration,
    ) -> Load {
        let file = |suffix: &str| dir.join(format!("{name}{suffix}"));
        let log = std::fs::File::create(file(".out")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", client_ns])
            .arg(load_bin())
            .args(
                targets
                    .iter()
                    .flat_map(|t| ["--target".to_string(), t.to_string()]),
            )
            .arg("--ca")
            .arg(dir.join("ca.pem"))
            .args(["--server-name", "baton.test"])
            .args(["--connections", &connections.to_string()])
            .args(defaults_not_in(
                &[
                    ("--request-size", "512"),
                    ("--request-interval", "10ms"),
                    ("--stream-rate", "65536"),
                    ("--progress-interval", "1s"),
                ],
                extra,
            ))
            .arg("--stop-file")
            .arg(file(".stop"))
            .arg("--summary-file")
            .arg(file("-summary.json"))
            .arg("--gap-log")
            .arg(file("-gaps.log"))
            .arg("--print-conn-ids")
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn baton-load");
        let mut load = Load {
            child: Some(child),
            dir: dir.to_path_buf(),
            name: name.into(),
            connections,
        };
        let start = Instant::now();
        while !load
            .output()
            .lines()
            .any(|l| l == format!("ready connections={connections}"))
        {
            if let Some(st) = load.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("baton-load {name} exited early ({st}):\n{}", load.output());
            }
            assert!(
                start.elapsed() < patience,
                "baton-load {name}: {connections} connections not up in {} s:\n{}",
                patience.as_secs(),
                load.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        load
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn file(&self, suffix: &str) -> PathBuf {
        self.dir.join(format!("{}{suffix}", self.name))
    }

    /// What baton-load printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.file(".out")).unwrap_or_default()
    }

    /// Requests completed so far on each connection (from the gap log, which baton-load flushes
    /// every 100 ms; a line still being written is not counted).
    pub fn requests_per_connection(&self) -> Vec<u64> {
        let text = std::fs::read_to_string(self.file("-gaps.log")).unwrap_or_default();
        let mut n = vec![0u64; self.connections];
        let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
        for line in complete.lines() {
            if let Some(i) = line
                .split_whitespace()
                .next()
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|&i| i < self.connections)
            {
                n[i] += 1;
            }
        }
        n
    }

    /// Whether baton-load is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Stops baton-load through its stop file (waiting up to `patience`) and returns its JSON
    /// summary.
    pub fn stop(&mut self, patience: Duration) -> Value {
        std::fs::write(self.file(".stop"), b"stop\n").unwrap();
        let mut child = self.child.take().expect("baton-load running");
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > patience {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "baton-load {} did not stop within {} s of its stop file:\n{}",
                    self.name,
                    patience.as_secs(),
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = std::fs::read_to_string(self.file("-summary.json"))
            .unwrap_or_else(|e| panic!("baton-load {} ({status}) left no summary: {e}", self.name));
        serde_json::from_str(&text).unwrap()
    }
}

/// The `(option, value)` defaults whose option `extra` does not give itself (baton-load refuses an
/// option given twice).
fn defaults_not_in<'a>(defaults: &[(&'a str, &'a str)], extra: &[&str]) -> Vec<&'a str> {
    defaults
        .iter()
        .filter(|(option, _)| !extra.contains(option))
        .flat_map(|&(option, value)| [option, value])
        .collect()
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- baton-load {} output ----\n{}",
                self.name,
                tail(&self.output(), 200)
            );
        }
    }
}
