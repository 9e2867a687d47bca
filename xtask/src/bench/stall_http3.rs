//! What `cargo xtask bench --only http3-stall` adds to the stall bench (stall.rs, which measures
//! and reports): the lab's two workers run as HTTP/3 reverse proxies with a `baton-upstream`
//! beside each (the set-up of `cargo xtask demo --http3`, `Lab::up` with `http3`), and the
//! request loop: `h3-load`
//! (interop/h3-stock: h3 over crates.io quinn) in the client namespace, `--small-only
//! --concurrency 1` (a back-to-back GET loop per connection) with `--gap-log`. h3-load has no
//! impairment of its own: an emulated path is `baton-path`, a UDP relay in the client namespace in
//! front of the VIP (`--rtt`, `--loss`), the one the netns HTTP/3 test uses.
use super::e2e::{Lab, say};
use super::stall::PathPoint;
use crate::demo::{self, SERVICE_NAME};
use crate::lab;
use crate::netpath::num;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

pub(super) const TAG: &str = "http3-stall";

/// Where `baton-path` listens in the client namespace when the path is emulated.
const RELAY: &str = "127.0.0.1:24433";

/// SIGTERM, up to `grace` to exit, then SIGKILL; reaped.
fn stop(child: &mut Child, grace: Duration) {
    // SAFETY: kill(2) on a child we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether a path needs the relay: an emulated round trip or loss.
fn relayed(path: &PathPoint) -> bool {
    path.emulated_rtt() || path.loss_pct > 0.0
}

/// baton-path's arguments for `path` (what it adds; the lab's ~0.1 ms are not emulated).
fn relay_args(path: &PathPoint) -> Vec<String> {
    let rtt = if path.emulated_rtt() {
        format!("{}ms", num(path.rtt_ms))
    } else {
        "0".into()
    };
    vec![
        "--rtt".into(),
        rtt,
        "--loss".into(),
        format!("{}%", num(path.loss_pct)),
    ]
}

/// A running baton-path: its stdout is kept for the JSON line it prints when stopped.
struct Relay {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

/// h3-load (and the relay in front of the VIP when the path is emulated), in the client
/// namespace; both killed on drop.
pub(super) struct H3Client {
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
    relay: Option<Relay>,
    path: PathPoint,
}

impl H3Client {
    /// Starts the relay (if the path needs one) and h3-load: `connections` back-to-back loops of
    /// `GET /bytes/{size}`, each completion in `gap_log`.
    pub(super) fn start(
        lab: &Lab,
        h3_load: &Path,
        path: &PathPoint,
        connections: usize,
        size: usize,
        gap_log: &Path,
    ) -> Result<H3Client> {
        let state = &lab.run.state;
        let mut client = H3Client {
            child: None,
            out: state.join("h3-load.out"),
            err: state.join("h3-load.err"),
            relay: None,
            path: path.clone(),
        };
        let vip = demo::vip_target(lab::VIP4);
        let target = if relayed(path) {
            let args = relay_args(path);
            let mut child = Command::new("ip")
                .args(["netns", "exec", lab::CLIENT_NS])
                .arg(lab.run.bins.join("baton-path"))
                .args(["--listen", RELAY, "--to", &vip.to_string(), "--seed", "12"])
                .args(&args)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(state.join("baton-path.log"))?)
                .spawn()
                .context("starting baton-path")?;
            let stdout = BufReader::new(child.stdout.take().expect("piped"));
            // From here on the drop kills it, whatever happens.
            let relay = client.relay.insert(Relay { child, stdout });
            let mut line = String::new();
            relay.stdout.read_line(&mut line)?;
            if !line.starts_with("listening") {
                bail!(
                    "baton-path did not start ({line:?}); see {}/baton-path.log",
                    state.display()
                );
            }
            say(
                TAG,
                format!(
                    "baton-path in {}: {RELAY} -> {vip}, {}",
                    lab::CLIENT_NS,
                    args.join(" ")
                ),
            );
            RELAY.to_string()
        } else {
            vip.to_string()
        };
        let args: Vec<String> = [
            "--connect",
            &target,
            "--server-name",
            SERVICE_NAME,
            "--connections",
            &connections.to_string(),
            "--concurrency",
            "1",
            "--small-only",
            "--small-bytes",
            &size.to_string(),
            // Until stopped (SIGTERM: the request in flight ends, then the summary).
            "--duration-ms",
            "36000000",
            "--keep-alive-ms",
            "1000",
            "--idle-timeout-ms",
            "30000",
            "--gap-log",
            gap_log.to_str().context("state path is UTF-8")?,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        say(TAG, format!("starting h3-load {}", args.join(" ")));
        let child = Command::new("ip")
            .args(["netns", "exec", lab::CLIENT_NS])
            .arg(h3_load)
            .arg("--ca")
            .arg(state.join("pki/ca.pem"))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&client.out)?)
            .stderr(std::fs::File::create(&client.err)?)
            .spawn()
            .context("starting h3-load")?;
        client.child = Some(child);
        Ok(client)
    }

    /// Fails (with the end of h3-load's log) if h3-load or the relay exited.
    pub(super) fn check(&mut self) -> Result<()> {
        if let Some(c) = &mut self.child
            && let Some(status) = c.try_wait()?
        {
            bail!("h3-load exited early ({status}): {}", self.err_tail());
        }
        if let Some(r) = &mut self.relay
            && let Some(status) = r.child.try_wait()?
        {
            bail!("baton-path exited early ({status})");
        }
        Ok(())
    }

    fn err_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.err).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n  ")
    }

    /// Waits until `baton conns` lists `n` connections (h3-load's, the only client).
    pub(super) fn wait_listed(&mut self, lab: &Lab, n: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check()?;
            let listed = lab.conns()?.len();
            if listed == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the workers list {listed} connections, not h3-load's {n}, after {} s: {}",
                    limit.as_secs(),
                    self.err_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops h3-load (SIGTERM: the request in flight ends, then its summary) and the relay
    /// (its counts); returns h3-load's summary in the shape of baton-load's that the stall
    /// report reads.
    pub(super) fn stop(mut self, limit: Duration) -> Result<Value> {
        let mut child = self.child.take().context("h3-load is not running")?;
        // `ip netns exec` execs h3-load: the signal reaches it.
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "h3-load did not stop within {} s of SIGTERM: {}",
                    limit.as_secs(),
                    self.err_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let summary: Value = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .and_then(|l| serde_json::from_str(l).ok())
            .with_context(|| {
                format!("h3-load ({status}) printed no summary: {}", self.err_tail())
            })?;
        let relay = match self.relay.take() {
            None => None,
            Some(mut r) => {
                // SAFETY: as above, the relay is our child.
                unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
                let mut line = String::new();
                let _ = r.stdout.read_line(&mut line);
                stop(&mut r.child, Duration::from_secs(5));
                serde_json::from_str::<Value>(&line).ok()
            }
        };
        Ok(normalize(&summary, &self.path, relay.as_ref()))
    }
}

impl Drop for H3Client {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut r) = self.relay.take() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

/// h3-load's summary (and baton-path's counts, when relayed) as the keys of baton-load's
/// summary the stall report reads: `requests`, `failed`, `connection_errors`, `reconnects`,
/// `lost_packets`, `duration_s`, and `path` (`description`, `seed`, `up`/`down` with `packets`
/// and `dropped`).
fn normalize(h3: &Value, path: &PathPoint, relay: Option<&Value>) -> Value {
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let mut out = json!({
        "requests": n(h3, "requests"),
        "failed": n(h3, "failed"),
        "connection_errors": n(h3, "connection_errors"),
        "reconnects": n(h3, "reconnects"),
        "lost_packets": n(h3, "lost_packets"),
        "duration_s": h3["duration_s"].as_f64().unwrap_or(0.0),
    });
    if let Some(r) = relay {
        let dir = |d: &str| {
            let dropped = n(r, &format!("{d}_dropped"));
            json!({"packets": n(r, d) + dropped, "dropped": dropped})
        };
        let rtt = if path.emulated_rtt() {
            format!("RTT {} ms", num(path.rtt_ms))
        } else {
            "no added delay".to_string()
        };
        out["path"] = json!({
            "description": format!("by baton-path: {rtt}, loss {}% each way", num(path.loss_pct)),
            "seed": r["seed"],
            "up": dir("up"),
            "down": dir("down"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(rtt_ms: f64, loss_pct: f64) -> PathPoint {
        PathPoint { rtt_ms, loss_pct }
    }

    #[test]
    fn only_an_impaired_path_goes_through_the_relay() {
        assert!(!relayed(&path(0.1, 0.0)));
        assert!(relayed(&path(0.1, 1.0)));
        assert_eq!(relay_args(&path(0.1, 1.0)), ["--rtt", "0", "--loss", "1%"]);
        assert_eq!(
            relay_args(&path(20.0, 0.0)),
            ["--rtt", "20ms", "--loss", "0%"]
        );
    }

    #[test]
    fn h3_loads_summary_reads_as_baton_loads() {
        let h3 = json!({"requests": 900, "failed": 1, "connection_errors": 0, "reconnects": 0,
            "lost_packets": 3, "duration_s": 9.5, "handshakes": 1, "p99_ms": 1.0});
        let plain = normalize(&h3, &path(0.1, 0.0), None);
        assert_eq!(plain["requests"], 900);
        assert_eq!(plain["failed"], 1);
        assert_eq!(plain["lost_packets"], 3);
        assert_eq!(plain["duration_s"], 9.5);
        assert!(plain["path"].is_null());
        let relay = json!({"clients": 1, "up": 990, "down": 980, "up_dropped": 10,
            "down_dropped": 20, "seed": 12});
        let relayed = normalize(&h3, &path(20.0, 1.0), Some(&relay));
        let p = &relayed["path"];
        assert_eq!(
            p["description"],
            "by baton-path: RTT 20 ms, loss 1% each way"
        );
        assert_eq!(p["seed"], 12);
        assert_eq!(p["up"], json!({"packets": 1000, "dropped": 10}));
        assert_eq!(p["down"], json!({"packets": 1000, "dropped": 20}));
    }
}
