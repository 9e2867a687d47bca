//! Resilience of a live deployment, end to end: the real `baton-lb` (native XDP on veth), two real
//! `baton-worker` processes, the real load client `baton-load` (several connections, each with a
//! request loop and a long-lived byte-checked stream) and the `baton` CLI moving connections
//! between the workers in a loop, every process in its own network namespace.
//!
//! * `lb_restart_during_migration_load`: baton-lb is stopped the way an operator restarting it
//!   would (SIGTERM: it removes its control socket and exits, leaving the program attached
//!   through the pinned link; then SIGKILL: nothing is cleaned up, the socket file stays stale)
//!   and started again with the same config while migrations run. The data plane must keep
//!   forwarding through the pinned maps and link, and no connection, request or byte may be lost.
//! * `garbage_to_vip_during_migrations_does_not_disturb_live_connections`: thousands of junk
//!   datagrams to the VIP (random bytes, truncated short headers, server-ID CIDs with junk,
//!   long-header junk, and garbage on the exact CIDs of the migrating connections) while
//!   migrations run: nothing breaks, and the LB's counters account for the junk.
//!
//! Needs root. Run: `cargo test --release -p baton-tests --test resilience_netns -- --test-threads=1`.
mod support;

use lb_common::unhex;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

/// Connections baton-load keeps open.
const CONNECTIONS: usize = 8;
/// The longest request stall a client may see. A migration freezes a connection for a few to a
/// few tens of ms (docs/MIGRATION-FLOW.md: migrate_ms p99 ~25 ms in a debug build) and the load
/// pauses 10 ms between requests; datagrams forwarded late by a source are at worst retransmitted
/// after one probe timeout (~3x the sub-ms veth RTT, clamped to quinn's 1 ms timer granularity
/// plus ack delay: well under 100 ms). An LB restart must add nothing: the data plane forwards
/// from pinned maps throughout. A stall of a second would be an outage a user notices (and
/// several PTO doublings of lost packets), so 1 s is the bound.
const MAX_STALL_MS: f64 = 1000.0;

/// The `baton` CLI with this deployment's pin dir, LB control socket and migration config. Owned
/// paths only, so a migration thread can run it while the test restarts baton-lb.
#[derive(Clone)]
struct Cli {
    pin_dir: PathBuf,
    socket: PathBuf,
    migration_config: PathBuf,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(bin_dir().join("baton"))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--control-socket")
            .arg(&self.socket)
            .arg("--migration-config")
            .arg(&self.migration_config)
            .arg("--json")
            .args(args)
            .output()
            .expect("run baton")
    }

    /// `baton conns --json`; the CLI's stderr when the listing failed.
    fn conns(&self) -> Result<Vec<Value>, String> {
        let out = self.run(&["conns"]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice::<Value>(&out.stdout)
            .map_err(|e| format!("baton conns: {e}"))
            .and_then(|v| {
                v.as_array()
                    .cloned()
                    .ok_or_else(|| format!("baton conns: not a list: {v}"))
            })
    }

    /// `baton --json status`: link, program, daemon (works without a daemon).
    fn status(&self) -> Value {
        let out = self.run(&["status"]);
        assert!(
            out.status.success(),
            "baton status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("baton --json status prints JSON")
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        lb_counters(&self.pin_dir, &self.socket)
    }
}

/// Two baton-worker processes and the baton-load client, each in its namespace; killed on drop,
/// with their log tails printed when the test fails.
struct Deployment {
    dir: PathBuf,
    workers: [Option<Child>; 2],
    load: Option<Child>,
    load_started: Option<Instant>,
    cli: Cli,
}

impl Deployment {
    fn start(lab: &Lab) -> Deployment {
        let dir = std::env::temp_dir().join(format!("baton-res-{}-{}", std::process::id(), lab.lb));
        let migration_config = write_worker_configs(&dir);
        let mut d = Deployment {
            cli: Cli {
                pin_dir: lab.pin_dir.clone(),
                socket: lab.socket.clone(),
                migration_config,
            },
            dir,
            workers: [None, None],
            load: None,
            load_started: None,
        };
        for i in 0..2 {
            d.spawn_worker(lab, i);
        }
        d
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .unwrap()
    }

    fn log_text(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Log tails of every process, for failure messages.
    fn tails(&self, lab: &Lab) -> String {
        let mut s = String::new();
        for name in ["w1", "w2", "load"] {
            s += &format!(
                "\n---- {name} log (tail) ----\n{}",
                tail(&self.log_text(name), 40)
            );
        }
        s += &format!(
            "\n---- baton-lb log (tail) ----\n{}",
            tail(&lab.log_text(), 40)
        );
        s
    }

    fn spawn_worker(&mut self, lab: &Lab, i: usize) {
        self.workers[i] = Some(spawn_worker(lab, &self.dir, i, &[]));
    }

    /// Starts baton-load in the client namespace and waits until every connection is listed by
    /// the workers.
    fn start_load(&mut self, lab: &Lab) {
        let log = self.log_file("load");
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.client])
            .arg(load_bin())
            .arg("--target")
            .arg(format!("{VIP4}:{PORT}"))
            .arg("--ca")
            .arg(self.dir.join("ca.pem"))
            .args(["--server-name", "baton.test"])
            .args(["--connections", &CONNECTIONS.to_string()])
            .args(["--request-size", "512", "--request-interval", "10ms"])
            .args(["--stream-rate", "65536", "--progress-interval", "1s"])
            .arg("--stop-file")
            .arg(self.dir.join("load.stop"))
            .arg("--summary-file")
            .arg(self.dir.join("load-summary.json"))
            .arg("--print-conn-ids")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn baton-load");
        self.load = Some(child);
        self.load_started = Some(Instant::now());
        let start = Instant::now();
        loop {
            if let Some(st) = self.load.as_mut().unwrap().try_wait().unwrap() {
                panic!("baton-load exited early ({st}):{}", self.tails(lab));
            }
            if self.cli.conns().is_ok_and(|c| c.len() == CONNECTIONS) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "baton-load's {CONNECTIONS} connections not up in 20 s:{}",
                self.tails(lab)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops baton-load through its stop file and returns its JSON summary.
    fn stop_load(&mut self, lab: &Lab) -> Value {
        std::fs::write(self.dir.join("load.stop"), b"stop\n").unwrap();
        let mut child = self.load.take().expect("baton-load running");
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "baton-load did not stop within 20 s of its stop file:{}",
                    self.tails(lab)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text =
            std::fs::read_to_string(self.dir.join("load-summary.json")).unwrap_or_else(|e| {
                panic!(
                    "baton-load ({status}) left no summary: {e}{}",
                    self.tails(lab)
                )
            });
        serde_json::from_str(&text).unwrap()
    }

    /// Panics (with the log tails) unless both workers still run.
    fn assert_workers_running(&mut self, lab: &Lab) {
        for i in 0..2 {
            let st = self.workers[i].as_mut().unwrap().try_wait().unwrap();
            if let Some(st) = st {
                panic!("worker w{} exited ({st}):{}", i + 1, self.tails(lab));
            }
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for c in self.workers.iter_mut().chain([&mut self.load]) {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            for name in ["w1", "w2", "load"] {
                eprintln!("---- {name} log ----\n{}", tail(&self.log_text(name), 200));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `baton migrate` as the migration loop saw it.
#[derive(Debug, Clone)]
#[allow(dead_code)] // conn, to: read in failure messages (Debug)
struct Migration {
    start: Instant,
    end: Instant,
    conn: String,
    to: String,
    ok: bool,
    kind: String,
    error: String,
    total_ms: f64,
}

/// Moves every connection to the other worker, round after round, until `stop`. The CIDs of
/// the live connections (from each round's listing) go to `live_cids`.
fn migration_loop(
    cli: Cli,
    stop: Arc<AtomicBool>,
    live_cids: Arc<Mutex<Vec<Vec<u8>>>>,
    ok_count: Arc<AtomicUsize>,
) -> (Vec<Migration>, Vec<String>) {
    let mut done = Vec::new();
    let mut listing_errors = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let rows = match cli.conns() {
            Ok(r) => r,
            Err(e) => {
                listing_errors.push(e);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let cids: Vec<Vec<u8>> = rows
            .iter()
            .flat_map(|r| r["cids"].as_array().cloned().unwrap_or_default())
            .filter_map(|c| c.as_str().and_then(unhex))
            .collect();
        *live_cids.lock().unwrap() = cids;
        for r in rows {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let conn = r["conn"].as_str().unwrap().to_string();
            let to = if r["worker"] == "w1" { "w2" } else { "w1" };
            let start = Instant::now();
            let out = cli.run(&["migrate", &conn, "--to", to]);
            let end = Instant::now();
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let ok = out.status.success() && v["ok"] == true;
            if ok {
                ok_count.fetch_add(1, Ordering::SeqCst);
            }
            done.push(Migration {
                start,
                end,
                conn,
                to: to.to_string(),
                ok,
                kind: v["kind"].as_str().unwrap_or_default().to_string(),
                error: format!(
                    "{} {}",
                    v["error"].as_str().unwrap_or_default(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                total_ms: v["total_ms"].as_f64().unwrap_or(0.0),
            });
        }
    }
    (done, listing_errors)
}

/// Runs every read-only `baton` command, and an override set and delete, against a baton-lb that
/// takes each request and dies before answering (the test plays it on `socket`). Each must
/// succeed from the pinned maps and say so; the override must be written and removed through the
/// pins. Returns a figure for the RESULT lines.
fn cli_meets_a_dying_daemon(cli: &Cli, socket: &Path) -> String {
    let _ = std::fs::remove_file(socket);
    let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind the dying daemon");
    let taken = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let server = {
        let (taken, done) = (taken.clone(), done.clone());
        std::thread::spawn(move || {
            use std::io::BufRead;
            for s in listener.incoming() {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(s) = s else { continue };
                // Read the request, then go away without a word.
                let mut line = String::new();
                let _ = std::io::BufReader::new(&s).read_line(&mut line);
                taken.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let cid = format!("7f{}", "5a".repeat(CID_LEN - 1));
    let mut ran = Vec::new();
    let mut check = |args: &[&str]| -> Value {
        let started = Instant::now();
        let out = cli.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "`baton {}` with a daemon that went away must answer from the pinned maps; it failed: {stderr}",
            args.join(" ")
        );
        assert!(
            stderr.contains("went away"),
            "`baton {}` must say the daemon went away: stderr {stderr:?}",
            args.join(" ")
        );
        ran.push(format!("{}:{}ms", args[0], started.elapsed().as_millis()));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`baton --json {}` printed no JSON ({e}): {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    let st = check(&["status"]);
    assert!(st["daemon"].is_null() && st["attached"] == true, "{st}");
    let workers = check(&["workers"]);
    assert_eq!(workers.as_array().map(Vec::len), Some(2), "{workers}");
    let conns = check(&["conns"]);
    assert_eq!(conns.as_array().map(Vec::len), Some(CONNECTIONS), "{conns}");
    check(&["route", &cid]);
    // A mutating command completes through the pins: server ID 1 is w1's.
    check(&["override", "set", &cid, "1"]);
    let list = check(&["override", "list"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|o| o["cid"] == cid.as_str()),
        "the override written through the pins is listed: {list}"
    );
    let route = check(&["route", &cid]);
    assert_eq!(route["reason"], "override", "{route}");
    check(&["override", "del", &cid]);
    let list = check(&["override", "list"]);
    assert!(
        !list
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["cid"] == cid.as_str()),
        "the override removed through the pins is gone: {list}"
    );
    done.store(true, Ordering::SeqCst);
    let _ = std::os::unix::net::UnixStream::connect(socket);
    server.join().unwrap();
    let _ = std::fs::remove_file(socket);
    format!(
        "dying_daemon: requests_taken={} commands={}",
        taken.load(Ordering::SeqCst),
        ran.join(",")
    )
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>, k: &str) -> u64 {
    after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0)
}

/// Frames the data plane sent on to a worker.
fn forwarded(c: &BTreeMap<String, u64>) -> u64 {
    c.get("redirected").copied().unwrap_or(0) + c.get("tx").copied().unwrap_or(0)
}

/// What a user of the load cares about: nothing failed, nothing reconnected, every stream exact.
fn assert_load_clean(summary: &Value, context: &str) {
    let n = |k: &str| summary[k].as_u64().unwrap_or(u64::MAX);
    assert_eq!(
        n("established"),
        CONNECTIONS as u64,
        "connections up: {summary}{context}"
    );
    assert_eq!(n("failed"), 0, "failed requests: {summary}{context}");
    assert_eq!(n("reconnects"), 0, "reconnects: {summary}{context}");
    assert_eq!(
        n("connection_errors"),
        0,
        "connection errors: {summary}{context}"
    );
    assert_eq!(
        n("counter_breaks"),
        0,
        "session counter breaks: {summary}{context}"
    );
    assert_eq!(
        n("streams_not_exact"),
        0,
        "streams not byte-exact: {summary}{context}"
    );
    let sent = n("stream_bytes_sent");
    assert!(
        sent > 0 && sent != u64::MAX,
        "long streams carried data: {summary}{context}"
    );
    assert_eq!(
        n("stream_bytes_verified"),
        sent,
        "every stream byte echoed and checked: {summary}{context}"
    );
    assert!(
        n("requests") > 100,
        "requests completed: {summary}{context}"
    );
    assert_eq!(
        summary["ok"], true,
        "baton-load's verdict: {summary}{context}"
    );
    let stall = summary["max_stall_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(
        stall < MAX_STALL_MS,
        "longest client stall {stall:.1} ms (bound {MAX_STALL_MS} ms) on connection {} ending at t={} s: {summary}{context}",
        summary["max_stall_conn"],
        summary["max_stall_at_s"]
    );
}

/// Builds baton-lb, baton, baton-worker and baton-load first, so the run times printed are the
/// tests' own.
fn build_binaries() {
    let _ = bin_dir();
    let _ = worker_bin();
    let _ = load_bin();
}

/// The lab with baton-lb, both workers, and baton-load's connections up.
fn deploy_under_load() -> (Lab, Deployment) {
    build_binaries();
    let mut lab = Lab::new(LabOptions::default());
    lab.start_lb();
    let mut dep = Deployment::start(&lab);
    dep.start_load(&lab);
    (lab, dep)
}

fn runtime_ms(m: &Migration) -> u128 {
    (m.end - m.start).as_millis()
}

#[test]
fn lb_restart_during_migration_load() {
    let test_start = Instant::now();
    let (mut lab, mut dep) = deploy_under_load();
    let load_t0 = dep.load_started.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Mutex::new(Vec::new()));
    let ok_count = Arc::new(AtomicUsize::new(0));
    let mig = {
        let (cli, stop, live, ok) = (
            dep.cli.clone(),
            stop.clone(),
            live.clone(),
            ok_count.clone(),
        );
        std::thread::spawn(move || migration_loop(cli, stop, live, ok))
    };

    // Each down window: (stopped, running again, how it was stopped).
    let mut windows: Vec<(Instant, Instant, &str)> = Vec::new();
    let mut figures = Vec::new();
    std::thread::sleep(Duration::from_secs(5));
    for (signal, how) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
        let link_before = dep.cli.status();
        let before = dep.cli.counters();
        let down = Instant::now();
        lab.stop_lb(signal);
        let stopped_ms = down.elapsed().as_millis();
        // What an operator sees with the daemon gone: the program still attached (pinned link),
        // no daemon. SIGTERM removes the control socket; SIGKILL leaves it behind, stale.
        let st = dep.cli.status();
        assert_eq!(
            st["attached"], true,
            "{how}: the XDP program must stay attached: {st}"
        );
        assert!(st["daemon"].is_null(), "{how}: no daemon answers: {st}");
        match how {
            "SIGTERM" => {
                assert!(
                    !lab.socket.exists(),
                    "SIGTERM: baton-lb removes its control socket on the way out"
                );
                assert!(
                    lab.log_text()
                        .contains("the XDP program stays attached and keeps forwarding"),
                    "SIGTERM: baton-lb says it leaves the program attached:{}",
                    dep.tails(&lab)
                );
            }
            _ => assert!(
                lab.socket.exists(),
                "SIGKILL: the control socket is left behind (stale)"
            ),
        }
        // Traffic keeps flowing through the pinned maps while no controller runs.
        std::thread::sleep(Duration::from_millis(2500));
        let during = dep.cli.counters();
        if how == "SIGKILL" {
            // A daemon that dies while it holds a request (what an operator's command meets
            // mid-restart), played deterministically on the stale socket's path.
            figures.push(cli_meets_a_dying_daemon(&dep.cli, &lab.socket));
        }
        let restart = Instant::now();
        lab.start_lb();
        let up = Instant::now();
        windows.push((down, up, how));
        // The same pinned link carried traffic throughout; the new daemon swapped its freshly
        // loaded program into it.
        let link_after = dep.cli.status();
        assert_eq!(
            link_after["link_id"], link_before["link_id"],
            "{how}: the restart kept the pinned XDP link: {link_before} -> {link_after}"
        );
        assert_eq!(link_after["attached"], true, "{link_after}");
        assert!(
            link_after["daemon"]["readopted"] == true,
            "{how}: the new daemon reports it re-adopted the link: {link_after}"
        );
        let readopted = lab
            .log_text()
            .matches("re-adopted the pinned XDP link")
            .count();
        assert_eq!(
            readopted,
            windows.len(),
            "{how}: the new baton-lb re-adopts the pinned link (once per restart):{}",
            dep.tails(&lab)
        );
        let fwd_down = forwarded(&during) - forwarded(&before);
        assert!(
            fwd_down > 500,
            "{how}: the data plane forwarded only {fwd_down} frames while no daemon ran: {before:?} -> {during:?}{}",
            dep.tails(&lab)
        );
        // Five seconds of traffic and migrations with the new daemon, and however long a loaded
        // machine needs for a full round of migrations through it.
        let ok_at_up = ok_count.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(60);
        while ok_count.load(Ordering::SeqCst) < ok_at_up + CONNECTIONS + 1 {
            assert!(
                Instant::now() < deadline,
                "{how}: fewer than {CONNECTIONS} migrations succeeded within 65 s of the restart{}",
                dep.tails(&lab)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let after = dep.cli.counters();
        let fwd_after = forwarded(&after) - forwarded(&during);
        assert!(
            fwd_after > 500,
            "{how}: forwarding after the restart: {during:?} -> {after:?}{}",
            dep.tails(&lab)
        );
        for k in ["no_worker", "redirect_error", "malformed"] {
            assert_eq!(
                delta(&after, &before, k),
                0,
                "{how}: counter {k} moved across the restart: {before:?} -> {after:?}{}",
                dep.tails(&lab)
            );
        }
        figures.push(format!(
            "{how}: link_id={} prog_id={}->{} exit_ms={stopped_ms} restart_ms={} down_ms={} forwarded_while_down={fwd_down} forwarded_after_5s={fwd_after} routed_override_total={}",
            link_after["link_id"],
            link_before["prog_id"],
            link_after["prog_id"],
            (up - restart).as_millis(),
            (up - down).as_millis(),
            after.get("routed_override").copied().unwrap_or(0)
        ));
    }

    stop.store(true, Ordering::Relaxed);
    let (migrations, listing_errors) = mig.join().expect("migration loop");
    // Every connection is still listed, each exactly once, before the load closes them.
    let rows = dep.cli.conns().expect("baton conns at the end");
    let summary = dep.stop_load(&lab);
    dep.assert_workers_running(&lab);
    let ctx = dep.tails(&lab);
    assert_eq!(rows.len(), CONNECTIONS, "{rows:?}{ctx}");

    // Migrations: every one succeeds, also those that overlap a window without a daemon or
    // straddle a stop (the CLI then finishes the override flip through the pinned maps).
    let failed: Vec<&Migration> = migrations.iter().filter(|m| !m.ok).collect();
    assert!(
        failed.is_empty(),
        "{} of {} migrations failed across the restarts: {failed:#?}{ctx}",
        failed.len(),
        migrations.len()
    );
    for (i, (_, up, how)) in windows.iter().enumerate() {
        let next = windows.get(i + 1).map(|w| w.0);
        let ok_after = migrations
            .iter()
            .filter(|m| m.ok && m.start >= *up && next.is_none_or(|n| m.end <= n))
            .count();
        assert!(
            ok_after >= CONNECTIONS,
            "after the {how} restart only {ok_after} migrations succeeded:\n{migrations:#?}{ctx}"
        );
    }
    let overlaps = |m: &Migration| {
        windows
            .iter()
            .any(|(down, up, _)| m.start < *up && m.end > *down)
    };
    let in_windows = migrations.iter().filter(|m| overlaps(m)).count();
    let went_away = migrations
        .iter()
        .filter(|m| m.error.contains("went away"))
        .count();
    // Started while baton-lb answered, finished after it was stopped: the CLI chose the daemon's
    // control socket for its override flip when it started (lb-user/src/migrate.rs).
    let straddling = migrations
        .iter()
        .filter(|m| {
            windows
                .iter()
                .any(|(down, _, _)| m.start < *down && m.end > *down)
        })
        .collect::<Vec<_>>();
    assert!(
        listing_errors.is_empty(),
        "baton conns failed during the run: {listing_errors:?}{ctx}"
    );
    assert_load_clean(&summary, &ctx);
    let mut ms: Vec<f64> = migrations
        .iter()
        .filter(|m| m.ok)
        .map(|m| m.total_ms)
        .collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    let rel = |t: Instant| (t - load_t0).as_secs_f64();
    for f in &figures {
        eprintln!("RESULT {f}");
    }
    eprintln!(
        "RESULT windows_s={:?} migrations={} all_ok overlapping_windows={in_windows} straddling_a_stop={} met_a_daemon_going_away={went_away} migrate_ms_p50={:.1} migrate_ms_max={:.1} longest_cli_ms={}",
        windows
            .iter()
            .map(|(d, u, h)| format!("{h}:{:.1}-{:.1}", rel(*d), rel(*u)))
            .collect::<Vec<_>>(),
        migrations.len(),
        straddling.len(),
        pct(0.5),
        ms.last().unwrap(),
        migrations.iter().map(runtime_ms).max().unwrap_or(0),
    );
    eprintln!(
        "RESULT load requests={} failed={} reconnects={} max_stall_ms={} at_s={} p99_stall_ms={} stream_bytes={} lost_packets={} test_s={:.1}",
        summary["requests"],
        summary["failed"],
        summary["reconnects"],
        summary["max_stall_ms"],
        summary["max_stall_at_s"],
        summary["p99_stall_ms"],
        summary["stream_bytes_verified"],
        summary["lost_packets"],
        test_start.elapsed().as_secs_f64()
    );
}

/// splitmix64: a small deterministic generator for the junk (seeded, so a failure reproduces).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Largest UDP payload that leaves the client's 1500-byte-MTU veth unfragmented (IPv4).
const MAX_UNFRAGMENTED: usize = 1500 - 20 - 8;

/// What the XDP program must do with a datagram of this payload sent to the VIP (lb-ebpf
/// `route_packet`): true when it drops it as malformed. A payload over the MTU leaves the client
/// as IP fragments: the first one (MF set) is malformed, the rest pass.
fn expect_malformed(p: &[u8]) -> bool {
    if p.len() > MAX_UNFRAGMENTED || p.is_empty() {
        return true;
    }
    if p[0] & 0x80 == 0 {
        return p.len() < 1 + CID_LEN;
    }
    if p.len() < 6 {
        return true;
    }
    let version = u32::from_be_bytes(p[1..5].try_into().unwrap());
    let dcid_len = p[5] as usize;
    let v1_or_v2 = version == 1 || version == 0x6b33_43cf;
    if v1_or_v2 && dcid_len > 20 {
        return true;
    }
    if p.len() < 6 + dcid_len {
        return true;
    }
    if v1_or_v2 {
        let raw = (p[0] >> 4) & 0x03;
        let ty = if version == 1 { raw } else { (raw + 3) & 0x03 };
        return ty == 3; // Retry: only servers send it
    }
    false
}

/// Server IDs of the lab's workers (w1, w2).
const SERVER_IDS: [u16; 2] = [1, 2];

/// Whether lb-ebpf must route this (well-formed) datagram by Maglev hash rather than by the
/// server ID in its DCID: the CID's config rotation bits say unroutable (0b111), or it is too
/// short to hold a server ID, or the server ID is not a configured worker's; Initials and 0-RTT
/// whose DCID does not describe itself as one of ours, and unknown versions, are hashed too.
/// (No junk CID carries an override unless it is a live connection's, whose server ID is known.)
fn expect_hashed(p: &[u8]) -> bool {
    if expect_malformed(p) {
        return false;
    }
    let by_cid = |cid: &[u8]| {
        cid.len() < 3
            || cid[0] >> 5 == 0b111
            || !SERVER_IDS.contains(&u16::from_be_bytes([cid[1], cid[2]]))
    };
    if p[0] & 0x80 == 0 {
        return by_cid(&p[1..1 + CID_LEN]);
    }
    let version = u32::from_be_bytes(p[1..5].try_into().unwrap());
    if version != 1 && version != 0x6b33_43cf {
        return true;
    }
    let dcid = &p[6..6 + p[5] as usize];
    let raw = (p[0] >> 4) & 0x03;
    let ty = if version == 1 { raw } else { (raw + 3) & 0x03 };
    match ty {
        // Initial / 0-RTT: by server ID only when the DCID has our length and says so itself.
        0 | 1 => dcid.len() != CID_LEN || (dcid[0] & 0x1f) as usize + 1 != CID_LEN || by_cid(dcid),
        _ => by_cid(dcid),
    }
}

/// Kinds of junk, with how many of each were sent.
#[derive(Default, Debug)]
struct Junk {
    random: u64,
    truncated_short: u64,
    server_id_cid: u64,
    long_header: u64,
    live_cid: u64,
    expected_malformed: u64,
    expected_hashed: u64,
    fragmented: u64,
    send_errors: u64,
}

fn varint(v: u64) -> Vec<u8> {
    match v {
        0..=63 => vec![v as u8],
        64..=16383 => (0x4000 | v as u16).to_be_bytes().to_vec(),
        16384..=1_073_741_823 => (0x8000_0000 | v as u32).to_be_bytes().to_vec(),
        _ => (0xc000_0000_0000_0000 | (v & 0x3fff_ffff_ffff_ffff))
            .to_be_bytes()
            .to_vec(),
    }
}

/// One junk datagram, chosen by `rng`; `live` are the CIDs of the live connections.
fn junk(rng: &mut Rng, live: &[Vec<u8>], tally: &mut Junk) -> Vec<u8> {
    let pick = rng.below(100);
    if pick < 15 {
        tally.random += 1;
        let n = rng.below(1501) as usize;
        rng.bytes(n)
    } else if pick < 30 {
        // A short header cut inside its DCID: 1..=cid_len bytes.
        tally.truncated_short += 1;
        let n = 1 + rng.below(CID_LEN as u64) as usize;
        let mut p = rng.bytes(n);
        p[0] = 0x40 | (p[0] & 0x3f);
        p
    } else if pick < 45 {
        // A well-formed server-ID CID of a live worker, then junk: the worker knows no such CID.
        tally.server_id_cid += 1;
        let mut p = vec![0x40 | (rng.next() as u8 & 0x3f)];
        p.extend(server_cid(1 + rng.below(2) as u16, rng.next() as u32));
        let n = rng.below(1400) as usize;
        p.extend(rng.bytes(n));
        p
    } else if pick < 65 {
        tally.long_header += 1;
        // QUIC v1 Initial/Handshake/0-RTT/Retry type bits, v2, version negotiation, unknown and
        // reserved versions; DCID lengths up to absurd; length fields up to 2^62-1.
        let versions = [
            1u32,
            1,
            1,
            0x6b33_43cf,
            0,
            0xdead_beef,
            0x1a2a_3a4a,
            0xff00_001d,
        ];
        let version = versions[rng.below(versions.len() as u64) as usize];
        let ty = rng.below(4) as u8;
        let mut p = vec![0xc0 | ty << 4 | (rng.next() as u8 & 0x0f)];
        p.extend(version.to_be_bytes());
        let dcid_len = match rng.below(4) {
            0 => rng.below(21) as usize,
            1 => CID_LEN,
            2 => 21 + rng.below(235) as usize,
            _ => 0,
        };
        p.push(dcid_len as u8);
        let dcid = if dcid_len == CID_LEN && rng.below(2) == 0 {
            server_cid(1 + rng.below(2) as u16, rng.next() as u32)
        } else {
            rng.bytes(dcid_len)
        };
        p.extend(dcid);
        let scid_len = rng.below(30) as usize;
        p.push(scid_len as u8);
        p.extend(rng.bytes(scid_len));
        if ty == 0 {
            p.extend(varint(rng.below(1 << 20))); // token length, mostly absurd
        }
        let length = match rng.below(3) {
            0 => rng.below(64),
            1 => 0x3fff_ffff_ffff_ffff,
            _ => rng.below(1 << 30),
        };
        p.extend(varint(length));
        let n = rng.below(1300) as usize;
        p.extend(rng.bytes(n));
        // Sometimes cut anywhere, header included.
        if rng.below(4) == 0 {
            let cut = rng.below(p.len() as u64 + 1) as usize;
            p.truncate(cut);
        }
        p
    } else {
        // The exact DCID of a live (possibly migrating) connection with a garbage payload: it
        // reaches the connection's worker (through an override during a cutover), or the
        // source's forward buffer, and must fail authentication there without harm.
        if live.is_empty() {
            return junk(rng, live, tally);
        }
        tally.live_cid += 1;
        let cid = &live[rng.below(live.len() as u64) as usize];
        let mut p = vec![0x40 | (rng.next() as u8 & 0x3f)];
        p.extend(cid);
        let n = 20 + rng.below(1180) as usize;
        p.extend(rng.bytes(n));
        p
    }
}

#[test]
fn garbage_to_vip_during_migrations_does_not_disturb_live_connections() {
    let test_start = Instant::now();
    let (lab, mut dep) = deploy_under_load();

    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Mutex::new(Vec::new()));
    let mig = {
        let (cli, stop, live) = (dep.cli.clone(), stop.clone(), live.clone());
        std::thread::spawn(move || migration_loop(cli, stop, live, Arc::default()))
    };
    // Let the first round of migrations publish the live CIDs.
    let start = Instant::now();
    while live.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no live CIDs listed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = dep.cli.counters();

    let total: u64 = std::env::var("BATON_JUNK_DATAGRAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12_000);
    let seed: u64 = std::env::var("BATON_JUNK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x0ba7_0e5e_ed00_0001);
    let sent = Arc::new(AtomicU64::new(0));
    let sock: UdpSocket = lab.client_socket(false);
    let junk_thread = {
        let (live, sent) = (live.clone(), sent.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let mut tally = Junk::default();
            let target = vip(false);
            let started = Instant::now();
            for i in 0..total {
                let live_now = live.lock().unwrap().clone();
                let p = junk(&mut rng, &live_now, &mut tally);
                if sock.send_to(&p, target).is_err() {
                    tally.send_errors += 1;
                    continue;
                }
                if expect_malformed(&p) {
                    tally.expected_malformed += 1;
                }
                if expect_hashed(&p) {
                    tally.expected_hashed += 1;
                }
                if p.len() > MAX_UNFRAGMENTED {
                    tally.fragmented += 1;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                // ~1000 datagrams/s: ~12 s for the default 12,000, overlapping many migrations.
                if i % 10 == 9 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            (tally, started.elapsed())
        })
    };
    let (tally, junk_time) = junk_thread.join().expect("junk sender");
    // Some more migrations after the junk, then stop.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (migrations, listing_errors) = mig.join().expect("migration loop");
    let after = dep.cli.counters();
    let summary = dep.stop_load(&lab);
    dep.assert_workers_running(&lab);
    let ctx = dep.tails(&lab);
    let lb_alive = lab.status_via_socket();
    assert!(
        lb_alive.is_some(),
        "baton-lb must still run and answer{ctx}"
    );

    assert_eq!(tally.send_errors, 0, "junk send errors: {tally:?}");
    let failed: Vec<&Migration> = migrations.iter().filter(|m| !m.ok).collect();
    assert!(
        failed.is_empty(),
        "migrations failed (migration_failed must be 0): {failed:#?}{ctx}"
    );
    assert!(
        migrations.len() >= 2 * CONNECTIONS,
        "migrations kept running under junk: only {}{ctx}",
        migrations.len()
    );
    assert!(
        listing_errors.is_empty(),
        "baton conns failed during the run: {listing_errors:?}{ctx}"
    );
    assert_load_clean(&summary, &ctx);
    for name in ["w1", "w2"] {
        let log = dep.log_text(name);
        assert!(
            !log.contains("panicked"),
            "worker {name} panicked:\n{}",
            tail(&log, 60)
        );
    }

    // The LB accounts for the junk: every datagram the XDP program must call malformed is
    // counted as such (legitimate QUIC never is), the second fragments of oversized datagrams
    // pass to the stack, and the rest was routed (nothing hit a missing worker or failed to
    // redirect).
    let d = |k: &str| delta(&after, &before, k);
    assert_eq!(
        d("malformed"),
        tally.expected_malformed,
        "malformed counter vs junk that lb-ebpf must drop: {tally:?}\n{before:?}\n{after:?}{ctx}"
    );
    assert!(
        d("passed") >= tally.fragmented,
        "second fragments pass: {tally:?} passed+{}",
        d("passed")
    );
    // The clients' connections are all up before the junk starts, so they send no Initial and
    // nothing of theirs is hashed: every hashed datagram is junk, and each one the data plane
    // must hash was hashed.
    assert_eq!(
        d("routed_hash"),
        tally.expected_hashed,
        "routed_hash counter vs junk that lb-ebpf must hash: {tally:?}\n{before:?}\n{after:?}{ctx}"
    );
    let junk_routed = sent.load(Ordering::Relaxed) - tally.expected_malformed;
    let routed = d("routed_override") + d("routed_server_id") + d("routed_hash");
    assert!(
        routed >= junk_routed,
        "routed {routed} < {junk_routed} well-formed junk datagrams: {tally:?}{ctx}"
    );
    assert_eq!(d("no_worker"), 0, "{before:?} -> {after:?}");
    assert_eq!(d("redirect_error"), 0, "{before:?} -> {after:?}");
    assert!(
        d("ipv4") >= sent.load(Ordering::Relaxed),
        "every junk datagram was seen as VIP traffic"
    );

    let mut ms: Vec<f64> = migrations.iter().map(|m| m.total_ms).collect();
    ms.sort_by(f64::total_cmp);
    eprintln!(
        "RESULT junk sent={} in {:.1}s {tally:?}",
        sent.load(Ordering::Relaxed),
        junk_time.as_secs_f64()
    );
    eprintln!(
        "RESULT counters_delta malformed={} passed={} routed_override={} routed_server_id={} routed_hash={} no_worker={} redirect_error={} ipv4={}",
        d("malformed"),
        d("passed"),
        d("routed_override"),
        d("routed_server_id"),
        d("routed_hash"),
        d("no_worker"),
        d("redirect_error"),
        d("ipv4")
    );
    eprintln!(
        "RESULT migrations={} migration_failed=0 migrate_ms_p50={:.1} migrate_ms_max={:.1} load requests={} failed={} reconnects={} max_stall_ms={} p99_stall_ms={} stream_bytes={} lost_packets={} test_s={:.1}",
        migrations.len(),
        ms[ms.len() / 2],
        ms.last().unwrap(),
        summary["requests"],
        summary["failed"],
        summary["reconnects"],
        summary["max_stall_ms"],
        summary["p99_stall_ms"],
        summary["stream_bytes_verified"],
        summary["lost_packets"],
        test_start.elapsed().as_secs_f64()
    );
}
