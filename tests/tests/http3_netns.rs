//! HTTP/3 through Baton end to end (issue 12): the real `baton-lb` (XDP), two `baton-worker`
//! processes serving the HTTP/3 proxy, a real upstream (`baton-upstream`, HTTP/1.1) beside each,
//! and HTTP/3 clients that are not ours: h3 over crates.io quinn (`h3-load`, interop/h3-stock)
//! and aioquic. They hold keep-alive connections issuing GETs (1 KB and 500 KB) and POSTs, some
//! concurrently, every body checked byte for byte, while `baton drain` empties one worker into the
//! other and back, over and over, so every connection moves at least 20 times. On the plain lab
//! path and through `baton-path` (RTT 40 ms, 1% loss each way). Needs root.
mod support;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// Each worker's upstream, in the worker's namespace (a sidecar: both answer alike).
const UPSTREAM: &str = "127.0.0.1:18080";

const PROXY: &str = r#"
[proxy]
[[proxy.upstreams]]
name = "app"
servers = ["127.0.0.1:18080"]
[[proxy.routes]]
upstream = "app"
"#;

/// How long a drain's source may wait for a connection's requests in flight to end: far beyond
/// a 500 KB response on the impaired path, so only a real hang fails.
const QUIESCE_MS: &str = "30000";

/// The two proxy workers and their upstreams; everything is killed on drop.
struct Front {
    dir: PathBuf,
    workers: Vec<Child>,
    upstreams: Vec<Child>,
    migration_config: PathBuf,
}

impl Front {
    fn start(lab: &Lab) -> Front {
        let dir = std::env::temp_dir().join(format!("baton-h3-{}-{}", std::process::id(), lab.lb));
        let migration_config = write_worker_configs_for(&dir, false, Some(PROXY));
        let mut front = Front {
            dir,
            workers: Vec::new(),
            upstreams: Vec::new(),
            migration_config,
        };
        for ns in &lab.workers {
            let mut up = Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(upstream_bin())
                .args(["--listen", UPSTREAM])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(up.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert!(
                line.starts_with("listening"),
                "baton-upstream in {ns}: {line:?}"
            );
            front.upstreams.push(up);
        }
        for i in 0..2 {
            front.workers.push(spawn_worker(lab, &front.dir, i, &[]));
        }
        front
    }

    fn baton(&self, lab: &Lab, args: &[&str]) -> std::process::Output {
        lab.baton_migration(&self.migration_config, args)
    }

    fn conns(&self, lab: &Lab) -> Vec<Value> {
        lab.conns(&self.migration_config)
    }

    fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("w{}.log", i + 1))).unwrap_or_default()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        for c in self.workers.iter_mut().chain(&mut self.upstreams) {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for i in 0..2 {
                eprintln!(
                    "---- w{} log (tail) ----\n{}",
                    i + 1,
                    tail(&self.log_text(i), 60)
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy, Debug)]
enum ClientKind {
    /// h3 over crates.io quinn (interop/h3-stock).
    H3Quinn,
    Aioquic,
}

/// One HTTP/3 load client process in the client namespace; stopped (SIGTERM: in-flight
/// requests finish, then its JSON summary) by [`HttpClient::stop`], killed on drop.
struct HttpClient {
    name: String,
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
}

impl HttpClient {
    fn start(
        lab: &Lab,
        front: &Front,
        kind: ClientKind,
        target: &str,
        connections: usize,
        concurrency: usize,
    ) -> HttpClient {
        let name = format!("{kind:?}").to_lowercase();
        let out = front.dir.join(format!("{name}.out"));
        let err = front.dir.join(format!("{name}.err"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.client]);
        match kind {
            ClientKind::H3Quinn => {
                cmd.arg(h3_load_bin());
            }
            ClientKind::Aioquic => {
                cmd.arg("python3")
                    .arg(workspace_root().join("tests/support/h3_aioquic_client.py"));
            }
        }
        let ca = front.dir.join("ca.pem");
        cmd.args(["--connect", target, "--server-name", "baton.test", "--ca"])
            .arg(&ca)
            .args(["--connections", &connections.to_string()])
            .args(["--concurrency", &concurrency.to_string()])
            // Until stopped (the summary comes at SIGTERM).
            .args(["--duration-ms", "3600000"])
            .args(["--small-bytes", "1000", "--large-bytes", "500000"])
            .args(["--post-bytes", "65536", "--keep-alive-ms", "1000"])
            .args(["--idle-timeout-ms", "30000"])
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        HttpClient {
            name,
            child: Some(cmd.spawn().unwrap()),
            out,
            err,
        }
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn stop(&mut self) -> Value {
        let mut child = self.child.take().expect("running");
        // `ip netns exec` execs the client: the signal reaches it.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} did not stop: {}", self.name, self.stderr_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or("");
        serde_json::from_str(line).unwrap_or_else(|_| {
            panic!(
                "{} printed no summary: {text:?}\n{}",
                self.name,
                self.stderr_tail()
            )
        })
    }

    fn stderr_tail(&self) -> String {
        tail(&std::fs::read_to_string(&self.err).unwrap_or_default(), 30)
    }
}

impl Drop for HttpClient {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- {} (tail) ----\n{}", self.name, self.stderr_tail());
        }
    }
}

/// The emulated path in the client namespace (`baton-path`): clients send to its address.
struct PathRelay(Child);

impl PathRelay {
    fn start(lab: &Lab, listen: &str, rtt: &str, loss: &str) -> PathRelay {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.client])
            .arg(path_relay_bin())
            .args(["--listen", listen, "--to", &vip(false).to_string()])
            .args(["--rtt", rtt, "--loss", loss, "--seed", "12"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("listening"), "baton-path: {line:?}");
        PathRelay(child)
    }
}

impl Drop for PathRelay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn assert_clean(summary: &Value, connections: u64, name: &str) {
    let n = |k: &str| summary[k].as_u64().unwrap_or(u64::MAX);
    assert!(n("requests") > 0, "{name}: no request made: {summary}");
    assert_eq!(
        n("failed"),
        0,
        "{name}: every request answered byte-exact: {summary}"
    );
    assert_eq!(
        (n("handshakes"), n("reconnects"), n("connection_errors")),
        (connections, 0, 0),
        "{name}: one handshake per connection, no reconnect, no connection error: {summary}"
    );
}

/// `rounds` drains alternating w1 -> w2 and w2 -> w1 under both clients' load, through `target`.
fn drains_under_http3_load(name: &str, target: &str, lab: &Lab, front: &Front, rounds: usize) {
    const H3: usize = 4;
    const AIOQUIC: usize = 3;
    let mut h3 = HttpClient::start(lab, front, ClientKind::H3Quinn, target, H3, 2);
    let mut aio = HttpClient::start(lab, front, ClientKind::Aioquic, target, AIOQUIC, 2);
    wait_for(
        "the workers to list every HTTP/3 connection",
        || front.conns(lab).len() == H3 + AIOQUIC,
        || {
            format!(
                "{:?}\nh3: {}\naioquic: {}",
                front.conns(lab),
                h3.stderr_tail(),
                aio.stderr_tail()
            )
        },
    );
    // Some requests first, on both workers (Maglev spread the new connections).
    std::thread::sleep(Duration::from_secs(1));
    let mut moved_per_conn = std::collections::BTreeMap::<String, usize>::new();
    let mut migration_p50 = Vec::new();
    let mut migration_p99 = Vec::new();
    let mut retried = 0;
    for round in 0..rounds {
        let (from, to) = if round % 2 == 0 {
            ("w1", "w2")
        } else {
            ("w2", "w1")
        };
        let before: Vec<String> = front
            .conns(lab)
            .iter()
            .filter(|r| r["worker"] == from)
            .map(|r| r["conn"].as_str().unwrap().to_string())
            .collect();
        let out = front.baton(
            lab,
            &[
                "drain",
                from,
                "--to",
                to,
                "--quiesce-timeout-ms",
                QUIESCE_MS,
                "--busy-retries",
                "5",
            ],
        );
        let s: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert!(
            out.status.success() && s["failed"] == 0 && s["moved"] == before.len(),
            "{name} round {round}: baton drain {from} --to {to}: {s}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        retried += s["retried"].as_u64().unwrap_or(0);
        if s["moved"].as_u64().unwrap_or(0) > 0 {
            migration_p50.push(s["migration_ms_p50"].as_f64().unwrap_or(0.0));
            migration_p99.push(s["migration_ms_p99"].as_f64().unwrap_or(0.0));
        }
        for c in before {
            *moved_per_conn.entry(c).or_default() += 1;
        }
        let left: Vec<Value> = front
            .conns(lab)
            .into_iter()
            .filter(|r| r["worker"] == from)
            .collect();
        assert!(
            left.is_empty(),
            "{name} round {round}: {from} drained: {left:?}"
        );
        assert!(
            h3.running() && aio.running(),
            "{name} round {round}: clients still running"
        );
    }
    let h3_summary = h3.stop();
    let aio_summary = aio.stop();
    assert_clean(&h3_summary, H3 as u64, &format!("{name}: h3 over quinn"));
    assert_clean(&aio_summary, AIOQUIC as u64, &format!("{name}: aioquic"));
    assert_eq!(
        moved_per_conn.len(),
        H3 + AIOQUIC,
        "{name}: the same connections all along"
    );
    let fewest = moved_per_conn.values().min().copied().unwrap_or(0);
    assert!(
        fewest >= rounds - 1,
        "{name}: every connection moved in every round after the first: {moved_per_conn:?}"
    );
    migration_p50.sort_by(f64::total_cmp);
    migration_p99.sort_by(f64::total_cmp);
    let migrations: usize = moved_per_conn.values().sum();
    eprintln!(
        "RESULT {name} connections={} requests={} failed=0 migrations={migrations} \
         migration_failed=0 busy_retried={retried} reconnects=0 p50_migration_ms={:.1} \
         p99_migration_ms={:.1} h3_p99_ms={} aioquic_p99_ms={}",
        H3 + AIOQUIC,
        h3_summary["requests"].as_u64().unwrap_or(0)
            + aio_summary["requests"].as_u64().unwrap_or(0),
        migration_p50[migration_p50.len() / 2],
        migration_p99.last().copied().unwrap_or(0.0),
        h3_summary["p99_ms"],
        aio_summary["p99_ms"],
    );
}

#[test]
fn http3_clients_keep_their_connections_through_repeated_drains() {
    let mut lab = Lab::new(LabOptions::default());
    lab.start_lb();
    let front = Front::start(&lab);
    let target = format!("{}", vip(false));
    drains_under_http3_load("http3-plain", &target, &lab, &front, 21);
}

#[test]
fn http3_clients_keep_their_connections_through_drains_on_an_impaired_path() {
    let mut lab = Lab::new(LabOptions::default());
    lab.start_lb();
    let front = Front::start(&lab);
    let relay_addr = "127.0.0.1:24433";
    let _relay = PathRelay::start(&lab, relay_addr, "40ms", "1%");
    drains_under_http3_load("http3-rtt40-loss1", relay_addr, &lab, &front, 21);
}
