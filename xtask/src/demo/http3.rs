//! `cargo xtask demo --http3`: the demo's scenario with HTTP/3, the protocol real clients speak.
//!
//! Beside each worker (in its namespace) a real upstream HTTP server, `baton-upstream` (HTTP/1.1
//! keep-alive, on 127.0.0.1:18080: each worker's own sidecar, both answer alike). Both workers run
//! Baton's HTTP/3 reverse proxy (`service = "proxy"`, one route to that upstream). In the client
//! namespace `h3-load` (h3 over crates.io quinn, without any Baton patch: interop/h3-stock), one
//! process per address family, holds keep-alive connections through the VIPs, two request loops
//! on each (GET 1 kB, GET 500 kB, POST of 64 KiB echoed back, round robin; every body checked byte
//! for byte). While it runs every connection moves w1 -> w2 -> w1, `--rounds` times, with `baton
//! migrate`: an HTTP/3 connection moves between requests, so the source waits for the requests in
//! flight to end (up to [`QUIESCE_MS`]); one still busy after that rolls back
//! (`requests_in_flight`) and is tried again, up to `BUSY_RETRIES` times. With `--rtt`,
//! `--jitter`, `--loss` the clients go through `baton-path` in the client namespace, a relay that
//! emulates that path (h3-load has no impairment of its own).
use super::{Migration, MigrationFigures, Run, WORKERS, say, vip_target};
use crate::lab;
use crate::netpath::{parse_ms, parse_pct};
use crate::util::workspace_root;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Every process this module starts, by its name in the state directory (`<name>.log`, `.pid`).
pub(crate) const PROCESSES: [&str; 6] = [
    "upstream-w1",
    "upstream-w2",
    "path-v4",
    "path-v6",
    "h3-load-v4",
    "h3-load-v6",
];

/// Each worker's upstream, in the worker's namespace.
const UPSTREAM: &str = "127.0.0.1:18080";

/// The workers' `[proxy]` section.
const PROXY: &str = r#"
[proxy]
via = "baton-demo"
[[proxy.upstreams]]
name = "app"
servers = ["127.0.0.1:18080"]
[[proxy.routes]]
upstream = "app"
"#;

/// How long a source waits for a connection's requests in flight (a 500 kB response takes a few
/// round trips; far more than that is a hang, not a boundary).
const QUIESCE_MS: u64 = 5000;

/// Request loops per connection (some requests concurrent on one connection).
const LOOPS: usize = 2;

/// Where the path relays listen in the client namespace, per family.
const RELAY_V4: &str = "127.0.0.1:24433";
const RELAY_V6: &str = "[::1]:24433";

const LARGE_BYTES: u64 = 500_000;
const SMALL_BYTES: u64 = 1000;
const POST_BYTES: u64 = 65_536;

/// Checks `bins` has what `--http3` runs beside the demo's binaries.
pub(super) fn preflight(bins: &Path) -> Result<()> {
    for b in ["baton-upstream", "baton-path"] {
        if !bins.join(b).is_file() {
            bail!(
                "{} is missing (build with `cargo build --release -p baton-test-upstream -p baton-load`)",
                bins.join(b).display()
            );
        }
    }
    Ok(())
}

/// Builds `h3-load` (interop/h3-stock, its own workspace: crates.io quinn and h3, none of our
/// patches) into `<target>/h3-stock`, `<target>` being the directory above `bins`; returns it.
pub(super) fn build_h3_load(bins: &Path) -> Result<PathBuf> {
    let target = bins
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target"));
    say("building h3-load (interop/h3-stock: h3 over crates.io quinn, release)");
    let release = crate::util::build_h3_stock(&target.join("h3-stock"))?;
    Ok(release.join("h3-load"))
}

/// One `h3-load` process of the run.
struct Client {
    name: &'static str,
    family: &'static str,
    target: SocketAddr,
    connections: usize,
}

impl Run {
    pub(super) fn demo_http3(
        &mut self,
        opts: &super::Options,
        h3_load: &Path,
        connections: usize,
        rounds: u32,
        duration: u64,
    ) -> Result<(bool, String)> {
        let started = Instant::now();
        self.serve_http3();
        let migrations = !opts.no_migrate;
        self.bring_up(None, true)?;
        self.start_upstreams()?;
        let relay = opts.path.relay_args()?;
        let emulated = !relay.is_empty();
        let v6 = connections / 2;
        let mut clients = vec![Client {
            name: "h3-load-v4",
            family: "IPv4",
            target: vip_target(lab::VIP4),
            connections: connections - v6,
        }];
        if v6 > 0 {
            clients.push(Client {
                name: "h3-load-v6",
                family: "IPv6",
                target: vip_target(lab::VIP6),
                connections: v6,
            });
        }
        if emulated {
            for (c, (name, listen)) in clients
                .iter_mut()
                .zip([("path-v4", RELAY_V4), ("path-v6", RELAY_V6)])
            {
                self.start_relay(name, listen, c.target, &relay)?;
                c.target = listen.parse().expect("a socket address");
            }
        }
        say(format!(
            "starting h3-load in namespace {}: {connections} HTTP/3 connections, {LOOPS} request loops each, {}",
            lab::CLIENT_NS,
            match opts.path.flags() {
                Some(f) => format!("through baton-path emulating {f}"),
                None => "on the lab's own path (veth, RTT ~0.1 ms, no loss)".into(),
            }
        ));
        for c in &clients {
            self.start_h3_load(h3_load, c)?;
        }
        let result = self.drive(
            |run: &mut Run| run.wait_listed(connections, Duration::from_secs(60)),
            connections,
            rounds,
            duration,
            opts,
            migrations,
            started,
            started,
        );
        // Stop the load whatever happened (in-flight requests finish), and collect the summaries.
        let summaries: Result<Vec<Value>> = clients
            .iter()
            .map(|c| self.stop_json(c.name, "\"requests\"", Duration::from_secs(120)))
            .collect();
        let paths: Vec<Value> = if emulated {
            ["path-v4", "path-v6"]
                .into_iter()
                .take(clients.len())
                .filter_map(|n| {
                    self.stop_json(n, "\"clients\"", Duration::from_secs(10))
                        .ok()
                })
                .collect()
        } else {
            Vec::new()
        };
        let migrated = result?;
        let summaries = summaries?;
        let shape = Shape {
            clients: &clients,
            summaries: &summaries,
            paths: &paths,
            path_flags: opts.path.flags(),
            rtt_ms: opts.path.rtt.as_deref().map_or(Ok(0.0), parse_ms)?,
            loss_pct: opts.path.loss.as_deref().map_or(Ok(0.0), parse_pct)?,
        };
        Ok(self.report_http3(&shape, &migrated, started.elapsed()))
    }

    /// The workers of [`Run::bring_up`] serve the HTTP/3 proxy (each to the upstream
    /// [`Run::start_upstreams`] starts beside it), and migrations wait for requests in flight.
    pub(crate) fn serve_http3(&mut self) {
        self.proxy = Some(PROXY);
        self.quiesce_ms = Some(QUIESCE_MS);
    }

    /// `baton-upstream` in each worker's namespace; waits until each listens.
    pub(crate) fn start_upstreams(&mut self) -> Result<()> {
        for (name, ns, ..) in WORKERS {
            say(format!(
                "starting baton-upstream (HTTP/1.1) in namespace {ns} on {UPSTREAM}, {name}'s upstream"
            ));
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns])
                .arg(self.bins.join("baton-upstream"))
                .args(["--listen", UPSTREAM]);
            let proc = format!("upstream-{name}");
            self.spawn(&proc, &mut cmd)?;
            self.wait_log_line(&proc, "listening")?;
        }
        Ok(())
    }

    /// `baton-path` in the client namespace from `listen` to `to`, with `args` (the path).
    fn start_relay(
        &mut self,
        name: &str,
        listen: &str,
        to: SocketAddr,
        args: &[String],
    ) -> Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", lab::CLIENT_NS])
            .arg(self.bins.join("baton-path"))
            .args(["--listen", listen, "--to", &to.to_string()])
            .args(args);
        self.spawn(name, &mut cmd)?;
        self.wait_log_line(name, "listening")
    }

    fn start_h3_load(&mut self, h3_load: &Path, c: &Client) -> Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", lab::CLIENT_NS])
            .arg(h3_load)
            .args(["--connect", &c.target.to_string()])
            .args(["--server-name", super::SERVICE_NAME, "--ca"])
            .arg(self.state.join("pki/ca.pem"))
            .args(["--connections", &c.connections.to_string()])
            .args(["--concurrency", &LOOPS.to_string()])
            // Until stopped (SIGTERM: the requests in flight finish, then the summary).
            .args(["--duration-ms", "86400000"])
            .args(["--small-bytes", &SMALL_BYTES.to_string()])
            .args(["--large-bytes", &LARGE_BYTES.to_string()])
            .args(["--post-bytes", &POST_BYTES.to_string()])
            .args(["--keep-alive-ms", "1000", "--idle-timeout-ms", "30000"])
            .arg("--progress")
            .env("RUST_LOG", "warn");
        self.spawn(c.name, &mut cmd)
    }

    /// Until `<name>.log` has a line starting with `prefix`.
    fn wait_log_line(&mut self, name: &str, prefix: &str) -> Result<()> {
        let log = self.state.join(format!("{name}.log"));
        super::wait_until(
            Duration::from_secs(30),
            &format!("{name} ({prefix:?})"),
            || {
                self.check_children()?;
                Ok(std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.starts_with(prefix)))
            },
        )
    }

    /// Until `baton conns` lists `connections` connections (every client connection is up),
    /// noting the clients' progress every 5 s.
    fn wait_listed(&mut self, connections: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let mut last_note = Instant::now();
        loop {
            self.check_children()?;
            let listed = self
                .baton()
                .args(["--json", "conns"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                .and_then(|v| v.as_array().map(Vec::len))
                .unwrap_or(0);
            if listed >= connections {
                return Ok(());
            }
            if last_note.elapsed() > Duration::from_secs(5) {
                say(format!(
                    "{listed} of {connections} connections listed by the workers"
                ));
                last_note = Instant::now();
            }
            if Instant::now() > deadline {
                bail!(
                    "only {listed} of {connections} HTTP/3 connections came up within {} s",
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// SIGTERM to child `name`, waits (up to `limit`) for it to exit and returns the last JSON
    /// line of its log that starts with `{` then `key`.
    fn stop_json(&mut self, name: &str, key: &str, limit: Duration) -> Result<Value> {
        let status = self.wait_stopped(name, limit, "SIGTERM", |child| {
            // `ip netns exec` execs the program: the signal reaches it.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        })?;
        let log = self.state.join(format!("{name}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let prefix = format!("{{{key}");
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with(&prefix))
            .with_context(|| {
                format!(
                    "{name} ({status}) printed no summary; see {}",
                    log.display()
                )
            })?;
        serde_json::from_str(line).with_context(|| format!("parsing {name}'s summary"))
    }

    fn report_http3(
        &self,
        shape: &Shape,
        migrated: &[Migration],
        elapsed: Duration,
    ) -> (bool, String) {
        let busy_retried = self.busy_retried.load(std::sync::atomic::Ordering::Relaxed);
        let overrides_left = self.overrides_left;
        report(
            shape,
            migrated,
            busy_retried,
            overrides_left,
            self.settle,
            elapsed,
        )
    }
}

/// What the report is made of, beside the migrations.
struct Shape<'a> {
    clients: &'a [Client],
    summaries: &'a [Value],
    /// baton-path's own summaries (emulated paths only).
    paths: &'a [Value],
    path_flags: Option<String>,
    rtt_ms: f64,
    loss_pct: f64,
}

fn report(
    shape: &Shape,
    migrated: &[Migration],
    busy_retried: usize,
    overrides_left: Option<usize>,
    settle: u64,
    elapsed: Duration,
) -> (bool, String) {
    let mut out = String::new();
    macro_rules! w {
        ($($t:tt)*) => {{ out.push_str(&format!($($t)*)); out.push('\n'); }};
    }
    let sum = |k: &str| -> u64 {
        shape
            .summaries
            .iter()
            .map(|s| s[k].as_u64().unwrap_or(0))
            .sum()
    };
    let most = |k: &str| -> f64 {
        shape
            .summaries
            .iter()
            .map(|s| s[k].as_f64().unwrap_or(0.0))
            .fold(0.0, f64::max)
    };
    let connections: usize = shape.clients.iter().map(|c| c.connections).sum();
    let per_family = |family: &str| -> usize {
        shape
            .clients
            .iter()
            .filter(|c| c.family == family)
            .map(|c| c.connections)
            .sum()
    };
    // A failure is anything a user would notice beyond a pause: a failed request (an error, a
    // status other than 200, a body not byte-exact), or a connection that broke.
    let failed = sum("failed") + sum("connection_errors");
    let reconnects = sum("reconnects");
    let handshakes = sum("handshakes");
    let figures = MigrationFigures::of(migrated);
    let migration_failed = figures.failed;
    let max_stall = most("max_stall_ms");

    w!("");
    w!("Baton demo report, HTTP/3 ({:.1} s)", elapsed.as_secs_f64());
    w!(
        "  front            both workers serve Baton's HTTP/3 reverse proxy; upstream: baton-upstream (HTTP/1.1 keep-alive) beside each worker on {UPSTREAM}"
    );
    w!(
        "  client load      {connections} HTTP/3 connections from namespace {} (h3-load: h3 over crates.io quinn), {LOOPS} request loops each \
         (GET {SMALL_BYTES} B, GET {LARGE_BYTES} B, POST {POST_BYTES} B echoed): {} over IPv4 to {}, {} over IPv6 to {}",
        lab::CLIENT_NS,
        per_family("IPv4"),
        vip_target(lab::VIP4),
        per_family("IPv6"),
        vip_target(lab::VIP6)
    );
    match &shape.path_flags {
        Some(flags) => {
            let total =
                |k: &str| -> u64 { shape.paths.iter().map(|p| p[k].as_u64().unwrap_or(0)).sum() };
            w!(
                "  path             emulated by baton-path in the client namespace: {flags}; up: {} datagrams, {} dropped; down: {} datagrams, {} dropped",
                total("up") + total("up_dropped"),
                total("up_dropped"),
                total("down") + total("down_dropped"),
                total("down_dropped")
            );
        }
        None => w!(
            "  path             the lab's own (veth, RTT ~0.1 ms, no loss; --rtt/--jitter/--loss emulate others)"
        ),
    }
    w!(
        "  requests         {} completed, {} failed (every body checked byte for byte); {:.1} MB of responses; latency p50 {:.1} ms, p99 {:.1} ms (the slower client's)",
        sum("requests"),
        sum("failed"),
        sum("bytes") as f64 / 1e6,
        most("p50_ms"),
        most("p99_ms"),
    );
    w!(
        "  connections      {handshakes} handshakes for {connections} connections, {} connection errors, {reconnects} reconnects",
        sum("connection_errors"),
    );
    w!(
        "  stall            largest gap between two completed requests on a connection: {max_stall:.1} ms{}",
        if shape.path_flags.is_some() {
            " (includes the emulated path's round trips)"
        } else {
            ""
        }
    );
    w!(
        "  migrations       {}",
        figures.line(&format!(
            ", {busy_retried} tried again after waiting {QUIESCE_MS} ms for requests in flight"
        ))
    );
    if let Some(left) = overrides_left {
        w!(
            "  LB overrides     {left} left {settle} s after the last migration (each goes once the client retires the CID)"
        );
    }
    for (c, s) in shape.clients.iter().zip(shape.summaries) {
        for e in s["errors"].as_array().into_iter().flatten().take(5) {
            w!(
                "  problem          {} ({}): {}",
                c.name,
                c.family,
                e.as_str().unwrap_or("?")
            );
        }
    }
    let ok = failed == 0
        && migration_failed == 0
        && reconnects == 0
        && connections > 0
        && handshakes == connections as u64
        && shape.summaries.len() == shape.clients.len();
    w!(
        "  verdict          {}",
        if ok {
            "PASS: every request answered byte-exact, one handshake per connection, no reconnect"
        } else {
            "FAIL"
        }
    );
    let emulated = if shape.path_flags.is_some() {
        format!(
            " emulated_rtt_ms={} emulated_loss_up_pct={} emulated_loss_down_pct={}",
            shape.rtt_ms, shape.loss_pct, shape.loss_pct
        )
    } else {
        String::new()
    };
    w!(
        "RESULT protocol=http3 connections={connections} requests={} failed={failed} migrations={} migration_failed={migration_failed} \
         reconnects={reconnects} max_stall_ms={max_stall:.1} p50_migration_ms={:.1} p99_migration_ms={:.1}{emulated} \
         busy_retried={busy_retried} ipv4_connections={} ipv6_connections={}",
        sum("requests"),
        figures.ok,
        figures.p50,
        figures.p99,
        per_family("IPv4"),
        per_family("IPv6"),
    );
    (ok, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients() -> Vec<Client> {
        vec![
            Client {
                name: "h3-load-v4",
                family: "IPv4",
                target: vip_target(lab::VIP4),
                connections: 2,
            },
            Client {
                name: "h3-load-v6",
                family: "IPv6",
                target: vip_target(lab::VIP6),
                connections: 1,
            },
        ]
    }

    fn migration(ok: bool, ms: f64) -> Migration {
        Migration {
            conn: "c".into(),
            ok,
            code: if ok { String::new() } else { "timeout".into() },
            ms,
            freeze_ms: 0.0,
            kind: String::new(),
        }
    }

    fn summary(requests: u64, failed: u64, handshakes: u64, stall: f64) -> Value {
        serde_json::json!({
            "requests": requests, "failed": failed, "bytes": 1000, "handshakes": handshakes,
            "reconnects": 0, "connection_errors": 0, "p50_ms": 1.0, "p99_ms": 9.0,
            "max_stall_ms": stall, "errors": [],
        })
    }

    fn result_line(text: &str) -> &str {
        text.lines().last().unwrap()
    }

    #[test]
    fn a_clean_run_passes_and_sums_both_clients() {
        let c = clients();
        let s = [summary(100, 0, 2, 12.5), summary(50, 0, 1, 30.0)];
        let shape = Shape {
            clients: &c,
            summaries: &s,
            paths: &[],
            path_flags: None,
            rtt_ms: 0.0,
            loss_pct: 0.0,
        };
        let m = [migration(true, 4.0), migration(true, 8.0)];
        let (ok, text) = report(&shape, &m, 3, Some(0), 2, Duration::from_secs(9));
        assert!(ok, "{text}");
        let r = result_line(&text);
        assert!(r.starts_with("RESULT protocol=http3 connections=3 requests=150 failed=0 migrations=2 migration_failed=0 reconnects=0 max_stall_ms=30.0"), "{r}");
        assert!(
            r.contains("busy_retried=3 ipv4_connections=2 ipv6_connections=1"),
            "{r}"
        );
    }

    #[test]
    fn failures_a_second_handshake_or_a_failed_migration_fail_the_run() {
        let c = clients();
        for (s, m) in [
            (
                [summary(100, 1, 2, 1.0), summary(50, 0, 1, 1.0)],
                migration(true, 1.0),
            ),
            (
                [summary(100, 0, 3, 1.0), summary(50, 0, 1, 1.0)],
                migration(true, 1.0),
            ),
            (
                [summary(100, 0, 2, 1.0), summary(50, 0, 1, 1.0)],
                migration(false, 1.0),
            ),
        ] {
            let shape = Shape {
                clients: &c,
                summaries: &s,
                paths: &[],
                path_flags: Some("--rtt 40ms".into()),
                rtt_ms: 40.0,
                loss_pct: 0.0,
            };
            let (ok, text) = report(&shape, &[m], 0, None, 2, Duration::from_secs(9));
            assert!(!ok, "{text}");
            assert!(text.contains("verdict          FAIL"), "{text}");
            assert!(result_line(&text).contains("emulated_rtt_ms=40"), "{text}");
        }
    }
}
