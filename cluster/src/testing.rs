//! Test support (feature `test-support`, never in release paths): a real etcd for tests, Debian's
//! `etcd` (installed by `cargo xtask setup`) on free loopback ports with a data directory of its
//! own, killed on drop. It can be SIGKILLed and started again on the same ports and data, as an
//! operator's etcd that crashed and came back. [`Etcd::start_in_netns`] runs it in a network
//! namespace instead, listening on every address there (for the netns labs).
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Run in this network namespace (`ip netns exec`), listening on all its addresses.
    netns: Option<String>,
}

/// The client port of an etcd in a namespace of its own (nothing else listens there).
pub const NETNS_CLIENT_PORT: u16 = 2379;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    /// Starts one; `name` keeps concurrent tests' data directories apart.
    pub fn start(name: &str) -> Etcd {
        let dir = std::env::temp_dir().join(format!("baton-etcd-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut etcd = Etcd {
            child: None,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            netns: None,
        };
        etcd.spawn();
        etcd
    }

    /// Starts one in network namespace `ns`, on port [`NETNS_CLIENT_PORT`] of every address
    /// there: reach it at any of the namespace's addresses.
    pub fn start_in_netns(name: &str, ns: &str) -> Etcd {
        let dir = std::env::temp_dir().join(format!("baton-etcd-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut etcd = Etcd {
            child: None,
            dir,
            client_port: NETNS_CLIENT_PORT,
            peer_port: NETNS_CLIENT_PORT + 1,
            netns: Some(ns.to_string()),
        };
        etcd.spawn();
        etcd
    }

    /// A command run where etcd runs (its namespace, if any).
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("etcd is not installed: run `cargo xtask setup` (Debian's etcd-server)");
        let client = self.endpoint();
        let listen = match self.netns {
            None => client.clone(),
            Some(_) => format!("http://0.0.0.0:{}", self.client_port),
        };
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .unwrap();
        let child = self
            .command(bin)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("data"))
            .args([
                "--listen-client-urls",
                &listen,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t={peer}")])
            // Fast elections: one member, on loopback.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Until etcd answers on its client port (a TCP connect and a health read).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().unwrap() {
                    panic!("etcd exited ({status}):\n{}", self.log());
                }
            }
            let reachable = self.netns.is_some()
                || std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_ok();
            let ok = reachable
                && self
                    .command("etcdctl")
                    .args(["--endpoints", &self.endpoint(), "endpoint", "health"])
                    .env("ETCDCTL_API", "3")
                    .output()
                    .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// `etcdctl ARGS` where etcd runs; its stdout (panics with its stderr if it fails).
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self
            .command("etcdctl")
            .args(["--endpoints", &self.endpoint()])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGKILL: no clean shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Started again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- etcd log (tail) ----");
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            for l in &lines[lines.len().saturating_sub(30)..] {
                eprintln!("{l}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
