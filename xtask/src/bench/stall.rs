//! `cargo xtask bench --only stall`: the stall a client sees while its connection is live-migrated,
//! on each of a set of network paths.
//!
//! The netns lab with baton-lb (XDP) and two workers (the demo's set-up), brought up once. For each
//! path (every `--rtt` with every `--loss`), a `baton-load` that emulates that path at the client
//! (`--rtt`, `--loss`: a client-side impairment of its UDP socket, since the lab kernel has no
//! netem; an RTT under 1 ms means the lab's own veth path, ~0.1 ms, with nothing added) runs a few
//! connections (default one), each a back-to-back request loop (no pause, small requests) that logs
//! every completion's wall-clock time (`--gap-log`). The bench moves a connection to the other
//! worker with `baton migrate`, `--stall-migrations` times (w1 -> w2 -> w1 ..., round robin over
//! the connections), and after each migration, with a pause on either side (at least three round
//! trips), waits a window as long as that migration's with nothing happening: the baseline.
//!
//! A window's figure is the largest gap between two consecutive completed requests of its
//! connection that overlaps the window (`baton migrate` start to exit, both on the host's wall
//! clock). The *added stall* of issue 10 is the figure of the windows that contain a migration
//! minus the same over the equal windows without one, at the same percentile, same loop, same
//! path: on a long path every gap is about one round trip anyway, so only the difference is what
//! the migration cost. Per path the report shows both beside each other, the difference, and how
//! many migrations succeeded. Targets per path: every migration succeeds, no client failure, and
//! the added p99 <= 5 ms (<= 10 ms with loss).
//!
//! Failures are results: a failed migration (say, rolled back after the quiesce timeout) counts in
//! the `ok` column and its window in the stall figures; a path gives up after
//! `--stall-give-up` failures in a row; a path whose load cannot run gets its error in the table
//! and the next path runs.
//!
//! `--only http3-stall` is the same bench over HTTP/3 ([`Protocol::Http3`], stall_http3.rs): the
//! workers are restarted as HTTP/3 reverse proxies with a `baton-upstream` beside each, the loop
//! is `h3-load --small-only --concurrency 1 --gap-log` (one connection), and a path is emulated by
//! `baton-path`, a UDP relay in the client namespace in front of the VIP, since h3-load has no
//! impairment of its own. Each migration waits for the request in flight (the source's quiesce
//! timeout, `baton migrate`'s default 2 s); one that rolls back (`requests_in_flight`) is a
//! failed migration like any other. Windows, baselines, targets and the report are this file's.
use super::e2e::{Lab, max, say, unix_us};
use super::stall_http3::{self, H3Client};
use crate::demo::{Load, percentile as pct};
use crate::netpath::{num, parse_ms, parse_pct};
use crate::util::workspace_root;
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Target: p99 of the added stall on a path without loss ...
const TARGET_ADDED_P99_MS: f64 = 5.0;
/// ... and with loss.
const TARGET_ADDED_P99_LOSS_MS: f64 = 10.0;
/// Below this round trip nothing is emulated: the lab's veth path is itself ~0.1 ms.
const MIN_EMULATED_RTT_MS: f64 = 1.0;

#[derive(clap::Args, Clone, Debug)]
pub struct StallOptions {
    /// stall: migrations to make on each path (each moves one connection to the other worker).
    #[arg(
        long = "stall-migrations",
        id = "stall-migrations",
        value_name = "N",
        default_value_t = 100
    )]
    pub migrations: usize,
    /// stall: connections running the back-to-back request loop (migrated in turn).
    #[arg(
        long = "stall-connections",
        id = "stall-connections",
        value_name = "N",
        default_value_t = 1
    )]
    pub connections: usize,
    /// stall: request body size in bytes.
    #[arg(
        long = "stall-request-size",
        id = "stall-request-size",
        value_name = "BYTES",
        default_value_t = 64
    )]
    pub request_size: usize,
    /// stall: pause before and after each baseline window, in ms, at least three round trips of
    /// the path (lets a migration's after-effects, e.g. the source's 250 ms forwarding, end
    /// before the baseline is taken).
    #[arg(
        long = "stall-pause-ms",
        id = "stall-pause-ms",
        value_name = "MS",
        default_value_t = 300
    )]
    pub pause_ms: u64,
    /// stall: round-trip times of the paths, comma-separated, emulated at the client (baton-load
    /// --rtt, half each way); under 1 ms: the lab's own path (~0.1 ms), nothing added. Every RTT
    /// runs with every --loss.
    #[arg(
        long = "rtt",
        id = "stall-rtt",
        value_name = "RTT,..",
        value_delimiter = ',',
        default_values = ["0.1ms", "20ms", "50ms", "100ms", "200ms"]
    )]
    pub rtt: Vec<String>,
    /// stall: random loss of the paths, comma-separated, each direction (baton-load --loss).
    #[arg(
        long = "loss",
        id = "stall-loss",
        value_name = "PERCENT,..",
        value_delimiter = ',',
        default_values = ["0", "1%"]
    )]
    pub loss: Vec<String>,
    /// stall: a path stops after this many failed migrations in a row (0: never), so a path on
    /// which migrations cannot work does not take 100 quiesce timeouts; the table says so.
    #[arg(
        long = "stall-give-up",
        id = "stall-give-up",
        value_name = "N",
        default_value_t = 10
    )]
    pub give_up: usize,
}

/// The request loop the stall is measured on.
pub(crate) enum Protocol {
    /// baton-load's demo protocol, the workers' `service = "demo"`.
    Demo,
    /// HTTP/3 GETs through the workers' reverse proxy, by `h3-load` (this binary): see
    /// stall_http3.rs.
    Http3 { h3_load: PathBuf },
}

impl Protocol {
    /// The bench's name for it: the progress lines' tag and the RESULT lines' first word.
    fn tag(&self) -> &'static str {
        match self {
            Protocol::Demo => "stall",
            Protocol::Http3 { .. } => stall_http3::TAG,
        }
    }
}

/// One path of the matrix.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct PathPoint {
    pub(super) rtt_ms: f64,
    pub(super) loss_pct: f64,
}

impl PathPoint {
    pub(super) fn emulated_rtt(&self) -> bool {
        self.rtt_ms >= MIN_EMULATED_RTT_MS
    }

    fn label(&self) -> String {
        let rtt = if self.emulated_rtt() {
            format!("RTT {} ms", num(self.rtt_ms))
        } else {
            format!("RTT {} ms (lab)", num(self.rtt_ms))
        };
        format!("{rtt}, loss {}%", num(self.loss_pct))
    }

    /// baton-load's path arguments.
    fn load_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.emulated_rtt() {
            args.extend(["--rtt".to_string(), format!("{}ms", num(self.rtt_ms))]);
        }
        if self.loss_pct > 0.0 {
            args.extend(["--loss".to_string(), format!("{}%", num(self.loss_pct))]);
        }
        args
    }

    /// The pause around a baseline window: at least three round trips.
    fn pause(&self, pause_ms: u64) -> Duration {
        Duration::from_secs_f64((pause_ms as f64).max(3.0 * self.rtt_ms) / 1000.0)
    }

    fn target_ms(&self) -> f64 {
        if self.loss_pct > 0.0 {
            TARGET_ADDED_P99_LOSS_MS
        } else {
            TARGET_ADDED_P99_MS
        }
    }
}

impl StallOptions {
    /// Every --rtt with every --loss, in that order.
    fn paths(&self) -> Result<Vec<PathPoint>> {
        let rtts = self
            .rtt
            .iter()
            .map(|r| parse_ms(r).context("--rtt"))
            .collect::<Result<Vec<_>>>()?;
        let losses = self
            .loss
            .iter()
            .map(|l| parse_pct(l).context("--loss"))
            .collect::<Result<Vec<_>>>()?;
        if rtts.is_empty() || losses.is_empty() {
            bail!("--rtt and --loss need at least one value each");
        }
        Ok(rtts
            .iter()
            .flat_map(|&rtt_ms| {
                losses
                    .iter()
                    .map(move |&loss_pct| PathPoint { rtt_ms, loss_pct })
            })
            .collect())
    }
}

/// A time window on the wall clock (unix microseconds) on one connection.
struct Window {
    conn: usize,
    start: u64,
    end: u64,
}

struct Migrated {
    window: Window,
    from: String,
    to: String,
    ok: bool,
    /// `baton migrate`'s total_ms (request to release), or the wall time when it failed.
    ms: f64,
    /// The source's `freeze_ms`: migrate_out request to export done.
    freeze_ms: f64,
    error: String,
}

/// What one path measured.
struct Measured {
    made: usize,
    ok: usize,
    /// Stopped after `--stall-give-up` failures in a row.
    gave_up: bool,
    /// Largest gap of each migration window / baseline window that had a completion after it.
    stall: Vec<f64>,
    base: Vec<f64>,
    /// Migration windows without a completion after them.
    missing: usize,
    migrate_ms: Vec<f64>,
    freeze_ms: Vec<f64>,
    /// Every gap between two completions of the run.
    ordinary: Vec<f64>,
    requests: u64,
    duration_s: f64,
    client_failures: u64,
    reconnects: u64,
    lost_packets: u64,
    /// Failed migrations by kind (digits and the connection key left out), most frequent first.
    failures: Vec<(usize, String)>,
    worst: String,
    /// The emulated path's seed and what it dropped (from baton-load's summary).
    path: Option<String>,
}

impl Measured {
    fn added(&self, p: f64) -> f64 {
        pct(&self.stall, p) - pct(&self.base, p)
    }
    fn added_max(&self) -> f64 {
        max(&self.stall) - max(&self.base)
    }
    fn pass(&self, path: &PathPoint) -> bool {
        self.ok == self.made
            && !self.gave_up
            && self.missing == 0
            && self.client_failures == 0
            && self.reconnects == 0
            && !self.stall.is_empty()
            && self.added(99.0) <= path.target_ms()
    }
}

struct Row {
    path: PathPoint,
    outcome: Result<Measured, String>,
}

/// The stall bench with `protocol`'s request loop.
pub fn run(bins: &Path, opts: &StallOptions, protocol: &Protocol) -> Result<()> {
    if opts.connections == 0 || opts.migrations == 0 {
        bail!("--stall-connections and --stall-migrations must be at least 1");
    }
    if matches!(protocol, Protocol::Http3 { .. }) && opts.connections != 1 {
        // h3-load does not say which client address is which of its connections.
        bail!("the HTTP/3 stall runs one connection (--stall-connections 1)");
    }
    let tag = protocol.tag();
    let paths = opts.paths()?;
    let started = std::time::Instant::now();
    let http3 = matches!(protocol, Protocol::Http3 { .. });
    let mut lab = Lab::up(
        bins,
        &workspace_root().join("lab/lb.toml"),
        Vec::new(),
        http3,
    )?;
    let mut rows = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        say(
            tag,
            format!("path {}/{}: {}", i + 1, paths.len(), path.label()),
        );
        let outcome = measure(&mut lab, opts, protocol, path, i);
        if let Err(e) = &outcome {
            say(tag, format!("{}: {e:#}", path.label()));
            lab.kill_load();
        }
        rows.push(Row {
            path: path.clone(),
            outcome: outcome.map_err(|e| format!("{e:#}")),
        });
        // The load is gone; anything else that exited means the lab is broken for the rest.
        if let Err(e) = lab.run.check_children() {
            lab.run.show_logs();
            for path in &paths[i + 1..] {
                rows.push(Row {
                    path: path.clone(),
                    outcome: Err(format!("not run: {e:#}")),
                });
            }
            break;
        }
    }
    drop(lab); // tear down before the report, so the report is the last thing printed
    println!("{}", report(opts, protocol, &rows));
    say(
        tag,
        format!("done in {:.0} s", started.elapsed().as_secs_f64()),
    );
    Ok(())
}

/// The request loop of one path.
enum Client {
    Demo(Load),
    Http3(Box<H3Client>),
}

impl Client {
    /// Starts `protocol`'s loop of `opts.connections` connections on `path`, logging every
    /// completion to `gap_log`, and waits until every connection is up; returns it with each
    /// connection's key (for `baton migrate`) and worker, by connection index.
    fn start(
        lab: &mut Lab,
        opts: &StallOptions,
        protocol: &Protocol,
        path: &PathPoint,
        gap_log: &Path,
    ) -> Result<(Client, Vec<String>, Vec<String>)> {
        let tag = protocol.tag();
        let n = opts.connections;
        let (client, locals) = match protocol {
            Protocol::Demo => {
                let mut args: Vec<String> = [
                    "--connections",
                    &n.to_string(),
                    "--request-interval",
                    "0",
                    "--stream-rate",
                    "0",
                    "--request-size",
                    &opts.request_size.to_string(),
                    "--progress-interval",
                    "10s",
                    "--gap-log",
                    gap_log.to_str().context("state path is UTF-8")?,
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                args.extend(path.load_args());
                let load = lab.start_load(tag, &args)?;
                let locals = lab.wait_ready(tag, &load, n, Duration::from_secs(60))?;
                say(
                    tag,
                    format!(
                        "{n} connection(s) up, back-to-back requests of {} bytes",
                        opts.request_size
                    ),
                );
                (Client::Demo(load), Some(locals))
            }
            Protocol::Http3 { h3_load } => {
                let mut c = H3Client::start(lab, h3_load, path, n, opts.request_size, gap_log)?;
                c.wait_listed(lab, n, Duration::from_secs(60))?;
                say(
                    tag,
                    format!(
                        "{n} HTTP/3 connection(s) up, back-to-back GET /bytes/{}",
                        opts.request_size
                    ),
                );
                (Client::Http3(Box::new(c)), None)
            }
        };
        std::thread::sleep(Duration::from_secs(1).max(path.pause(0) * 2));

        // Which connection key (for `baton migrate`) is which load connection, and where it is.
        let mut keys = vec![String::new(); n];
        let mut worker = vec![String::new(); n];
        let rows = lab.conns()?;
        match &locals {
            Some(locals) => {
                for row in rows {
                    if let Some(&i) = locals.get(&row.remote) {
                        keys[i] = row.conn;
                        worker[i] = row.worker;
                    }
                }
            }
            // h3-load is the only client, with one connection (`run` checked).
            None => {
                if let [row] = &rows[..] {
                    keys[0] = row.conn.clone();
                    worker[0] = row.worker.clone();
                } else {
                    bail!(
                        "`baton conns` lists {} connections, h3-load has one",
                        rows.len()
                    );
                }
            }
        }
        if let Some(i) = keys.iter().position(String::is_empty) {
            bail!("`baton conns` does not list load connection {i}");
        }
        Ok((client, keys, worker))
    }

    /// Fails if the load (or what it runs through) exited.
    fn check(&mut self, lab: &mut Lab) -> Result<()> {
        lab.run.check_children()?;
        match self {
            Client::Demo(_) => Ok(()),
            Client::Http3(c) => c.check(),
        }
    }

    /// Stops the load; its summary (baton-load's keys).
    fn stop(self, lab: &mut Lab) -> Result<serde_json::Value> {
        let limit = Duration::from_secs(30);
        match self {
            Client::Demo(load) => lab.stop_load(load, limit),
            Client::Http3(c) => c.stop(limit),
        }
    }
}

fn measure(
    lab: &mut Lab,
    opts: &StallOptions,
    protocol: &Protocol,
    path: &PathPoint,
    index: usize,
) -> Result<Measured> {
    let tag = protocol.tag();
    let gap_log = lab.run.state.join(format!("gaps-{index}.log"));
    let n = opts.connections;
    let (mut client, keys, mut worker) = Client::start(lab, opts, protocol, path, &gap_log)?;

    let pause = path.pause(opts.pause_ms);
    let mut migrated: Vec<Migrated> = Vec::with_capacity(opts.migrations);
    let mut baseline = Vec::with_capacity(opts.migrations);
    let mut in_a_row = 0;
    let mut gave_up = false;
    for i in 0..opts.migrations {
        client.check(lab)?;
        let c = i % n;
        let from = worker[c].clone();
        let to = if from == "w1" { "w2" } else { "w1" }.to_string();
        let start = unix_us();
        let m = lab.run.migrate(&keys[c], &to);
        let end = unix_us();
        if m.ok {
            worker[c] = to.clone();
            in_a_row = 0;
        } else {
            in_a_row += 1;
        }
        let len = end - start;
        migrated.push(Migrated {
            window: Window {
                conn: c,
                start,
                end,
            },
            from,
            to,
            ok: m.ok,
            ms: m.ms,
            freeze_ms: m.freeze_ms,
            error: m.kind,
        });
        // The baseline: a window as long as this migration's, nothing happening.
        std::thread::sleep(pause);
        let b = unix_us();
        std::thread::sleep(Duration::from_micros(len));
        baseline.push(Window {
            conn: c,
            start: b,
            end: unix_us(),
        });
        std::thread::sleep(pause);
        let done = i + 1;
        if !m.ok && done <= 3 {
            say(
                tag,
                format!("migration {done} failed: {}", migrated[i].error),
            );
        }
        if opts.give_up > 0 && in_a_row >= opts.give_up {
            say(
                tag,
                format!("{in_a_row} migrations failed in a row: giving up on this path"),
            );
            gave_up = true;
            break;
        }
        if done % 10 == 0 || done == opts.migrations {
            let ok: Vec<f64> = migrated.iter().filter(|m| m.ok).map(|m| m.ms).collect();
            say(
                tag,
                format!(
                    "{done}/{} migrations, {} failed; baton migrate p50 {:.1} ms, last {} -> {} {:.1} ms (window {:.1} ms)",
                    opts.migrations,
                    done - ok.len(),
                    pct(&ok, 50.0),
                    migrated[i].from,
                    migrated[i].to,
                    migrated[i].ms,
                    len as f64 / 1000.0
                ),
            );
        }
    }
    std::thread::sleep(Duration::from_millis(500).max(pause));
    say(tag, "stopping the load");
    let summary = client.stop(lab)?;
    let completions = read_gap_log(&gap_log)?;
    Ok(summarize(
        &summary,
        &completions,
        &migrated,
        &baseline,
        gave_up,
    ))
}

/// Completion times (unix us) per connection index, sorted.
fn read_gap_log(path: &Path) -> Result<HashMap<usize, Vec<u64>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut by_conn: HashMap<usize, Vec<u64>> = HashMap::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if let (Some(Ok(i)), Some(Ok(t))) = (
            it.next().map(str::parse::<usize>),
            it.next().map(str::parse::<u64>),
        ) {
            by_conn.entry(i).or_default().push(t);
        }
    }
    for v in by_conn.values_mut() {
        v.sort_unstable();
    }
    Ok(by_conn)
}

/// The largest gap between consecutive completions that overlaps `[start, end]`, in ms; `None`
/// when no request completed after the window (nothing to measure the gap with).
fn max_gap_ms(times: &[u64], start: u64, end: u64) -> Option<f64> {
    // Pairs (a, b) of consecutive completions with b > start and a <= end.
    let first_after_start = times.partition_point(|&t| t <= start);
    let from = first_after_start.saturating_sub(1);
    let upto = times.partition_point(|&t| t <= end); // times[upto] is the first after the window
    if upto >= times.len() || upto == 0 {
        return None;
    }
    (from..upto)
        .map(|i| times[i + 1] - times[i])
        .max()
        .map(|us| us as f64 / 1000.0)
}

/// A failure's kind: the error without the connection key and with numbers as `N`.
fn failure_kind(error: &str) -> String {
    // `baton migrate` errors read "<conn>: <kind>: <detail>".
    let text = error.split_once(": ").map_or(error, |(_, rest)| rest);
    let mut out = String::with_capacity(text.len());
    let mut in_number = false;
    for ch in text.chars() {
        if ch.is_ascii_digit() {
            if !in_number {
                out.push('N');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(ch);
        }
    }
    out
}

fn summarize(
    s: &serde_json::Value,
    completions: &HashMap<usize, Vec<u64>>,
    migrated: &[Migrated],
    baseline: &[Window],
    gave_up: bool,
) -> Measured {
    let empty = Vec::new();
    let times = |c: usize| completions.get(&c).unwrap_or(&empty);
    let per_migration: Vec<Option<f64>> = migrated
        .iter()
        .map(|m| max_gap_ms(times(m.window.conn), m.window.start, m.window.end))
        .collect();
    let stall: Vec<f64> = per_migration.iter().flatten().copied().collect();
    let base: Vec<f64> = baseline
        .iter()
        .filter_map(|w| max_gap_ms(times(w.conn), w.start, w.end))
        .collect();
    let worst = per_migration
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, st)| {
            let m = &migrated[i];
            format!(
                "#{} {}->{} {} stall {st:.1} ms (migrate {:.1} ms, freeze {:.1} ms)",
                i + 1,
                m.from,
                m.to,
                if m.ok { "ok" } else { "failed" },
                m.ms,
                m.freeze_ms
            )
        })
        .unwrap_or_default();
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for m in migrated.iter().filter(|m| !m.ok) {
        *kinds.entry(failure_kind(&m.error)).or_default() += 1;
    }
    let mut failures: Vec<(usize, String)> = kinds.into_iter().map(|(k, n)| (n, k)).collect();
    failures.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let p = &s["path"];
    let path = p.is_object().then(|| {
        let dir = |d: &serde_json::Value| format!("{} of {} dropped", d["dropped"], d["packets"]);
        format!(
            "emulated {} (seed {}): up {}, down {}",
            p["description"].as_str().unwrap_or("?"),
            p["seed"],
            dir(&p["up"]),
            dir(&p["down"])
        )
    });
    Measured {
        made: migrated.len(),
        ok: migrated.iter().filter(|m| m.ok).count(),
        gave_up,
        missing: per_migration.iter().filter(|s| s.is_none()).count(),
        stall,
        base,
        migrate_ms: migrated.iter().filter(|m| m.ok).map(|m| m.ms).collect(),
        freeze_ms: migrated
            .iter()
            .filter(|m| m.ok)
            .map(|m| m.freeze_ms)
            .collect(),
        ordinary: completions
            .values()
            .flat_map(|t| t.windows(2).map(|w| (w[1] - w[0]) as f64 / 1000.0))
            .collect(),
        requests: n("requests"),
        duration_s: s["duration_s"].as_f64().unwrap_or(0.0),
        client_failures: n("failed") + n("connection_errors") + n("counter_breaks"),
        reconnects: n("reconnects"),
        lost_packets: n("lost_packets"),
        failures,
        worst,
        path,
    }
}

/// `p50 / p99 / max` of `v`, each `{:.2}`.
fn three(p50: f64, p99: f64, max: f64) -> String {
    format!("{p50:.2} / {p99:.2} / {max:.2}")
}

fn report(opts: &StallOptions, protocol: &Protocol, rows: &[Row]) -> String {
    let mut out = String::new();
    macro_rules! w {
        ($($t:tt)*) => {{ out.push_str(&format!($($t)*)); out.push('\n'); }};
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    w!("");
    match protocol {
        Protocol::Demo => {
            w!(
                "== Live-migration stall by path (client-observed; netns lab, XDP baton-lb, two workers) =="
            );
            w!(
                "load     {} connection(s), back-to-back requests of {} B; up to {} migrations per path (w1 <-> w2); machine load average {load}",
                opts.connections,
                opts.request_size,
                opts.migrations,
            );
            w!(
                "paths    emulated at the client by baton-load (--rtt: half each way; --loss: each direction); RTT under {} ms: the lab's own veth path, nothing added",
                num(MIN_EMULATED_RTT_MS)
            );
        }
        Protocol::Http3 { .. } => {
            w!(
                "== HTTP/3 live-migration stall by path (client-observed; netns lab, XDP baton-lb, two workers proxying to a baton-upstream beside each) =="
            );
            w!(
                "load     h3-load (h3 over crates.io quinn), {} connection(s), back-to-back GET /bytes/{} (--small-only --concurrency 1); up to {} migrations per path (w1 <-> w2), each waiting for the request in flight (baton migrate's quiesce timeout, 2 s); machine load average {load}",
                opts.connections,
                opts.request_size,
                opts.migrations,
            );
            w!(
                "paths    emulated by baton-path, a UDP relay in the client namespace in front of the VIP (--rtt: half each way; --loss: each direction); RTT under {} ms: the lab's own veth path (through the relay only with loss)",
                num(MIN_EMULATED_RTT_MS)
            );
        }
    }
    w!(
        "windows  largest gap between completed requests in a window: around a migration (baton migrate start to exit) and in equal windows without one, same loop, same path"
    );
    w!(
        "added    stall added by the migration: migration windows minus windows without one, at the same percentile"
    );
    w!("");
    let mut table: Vec<[String; 7]> = vec![
        [
            "path",
            "ok/made",
            "migration windows (ms)",
            "no migration (ms)",
            "added stall (ms)",
            "ordinary",
            "verdict",
        ]
        .map(String::from),
        [
            "",
            "",
            "p50 / p99 / max",
            "p50 / p99 / max",
            "p50 / p99 / max",
            "gap p50",
            "",
        ]
        .map(String::from),
    ];
    let mut passed = 0;
    for r in rows {
        table.push(match &r.outcome {
            Ok(m) => {
                let pass = m.pass(&r.path);
                passed += usize::from(pass);
                [
                    r.path.label(),
                    format!("{}/{}{}", m.ok, m.made, if m.gave_up { "*" } else { "" }),
                    three(pct(&m.stall, 50.0), pct(&m.stall, 99.0), max(&m.stall)),
                    three(pct(&m.base, 50.0), pct(&m.base, 99.0), max(&m.base)),
                    three(m.added(50.0), m.added(99.0), m.added_max()),
                    format!("{:.2}", pct(&m.ordinary, 50.0)),
                    if pass { "PASS" } else { "FAIL" }.to_string(),
                ]
            }
            Err(e) => [
                r.path.label(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("FAIL ({})", e.lines().next().unwrap_or("")),
            ],
        });
    }
    // Columns as wide as their widest cell (the last one is not padded).
    let widths: Vec<usize> = (0..6)
        .map(|i| table.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in &table {
        let mut l = String::new();
        for (i, cell) in r.iter().enumerate() {
            match widths.get(i) {
                Some(&w) => l.push_str(&format!("{cell:<w$}   ")),
                None => l.push_str(cell),
            }
        }
        w!("{}", l.trim_end());
    }
    if rows
        .iter()
        .any(|r| r.outcome.as_ref().is_ok_and(|m| m.gave_up))
    {
        w!(
            "* gave up after {} failed migrations in a row (--stall-give-up)",
            opts.give_up
        );
    }
    w!("");
    for r in rows {
        let Ok(m) = &r.outcome else { continue };
        w!(
            "{}: baton migrate p50 {:.1} ms, p99 {:.1} ms; source freeze p50 {:.1} ms, p99 {:.1} ms; client {} requests ({:.0}/s), {} failed, {} reconnects, {} packets declared lost",
            r.path.label(),
            pct(&m.migrate_ms, 50.0),
            pct(&m.migrate_ms, 99.0),
            pct(&m.freeze_ms, 50.0),
            pct(&m.freeze_ms, 99.0),
            m.requests,
            m.requests as f64 / m.duration_s.max(1e-9),
            m.client_failures,
            m.reconnects,
            m.lost_packets
        );
        if let Some(p) = &m.path {
            w!("    path    {p}");
        }
        if !m.worst.is_empty() {
            w!("    worst   {}", m.worst);
        }
        for (n, kind) in m.failures.iter().take(3) {
            w!("    failed  {n}x {kind}");
        }
        if m.missing > 0 {
            w!(
                "    missing {} migration window(s) had no completed request after them",
                m.missing
            );
        }
    }
    w!("");
    w!(
        "target   per path: every migration ok, no failed request or reconnect, added stall p99 <= {} ms ({} ms with loss): {passed} of {} paths PASS",
        num(TARGET_ADDED_P99_MS),
        num(TARGET_ADDED_P99_LOSS_MS),
        rows.len()
    );
    let tag = protocol.tag();
    for r in rows {
        let key = format!(
            "{tag} rtt_ms={} loss_pct={}",
            num(r.path.rtt_ms),
            num(r.path.loss_pct)
        );
        match &r.outcome {
            Ok(m) => w!(
                "RESULT {key} migrations={} ok={} failed={} stall_p50_ms={:.2} stall_p99_ms={:.2} stall_max_ms={:.2} baseline_p50_ms={:.2} baseline_p99_ms={:.2} baseline_max_ms={:.2} added_p50_ms={:.2} added_p99_ms={:.2} added_max_ms={:.2} {}",
                m.made,
                m.ok,
                m.made - m.ok,
                pct(&m.stall, 50.0),
                pct(&m.stall, 99.0),
                max(&m.stall),
                pct(&m.base, 50.0),
                pct(&m.base, 99.0),
                max(&m.base),
                m.added(50.0),
                m.added(99.0),
                m.added_max(),
                if m.pass(&r.path) { "PASS" } else { "FAIL" }
            ),
            Err(_) => w!("RESULT {key} error FAIL"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_overlapping_a_window() {
        let t = [0, 10, 20, 100, 110, 120];
        // The 20 -> 100 gap straddles the window start.
        assert_eq!(max_gap_ms(&t, 50, 105), Some(0.08));
        // Inside a quiet stretch: the gap around it.
        assert_eq!(max_gap_ms(&t, 30, 40), Some(0.08));
        assert_eq!(max_gap_ms(&t, 100, 105), Some(0.01));
        // Nothing after the window.
        assert_eq!(max_gap_ms(&t, 115, 130), None);
    }

    fn opts(rtt: &[&str], loss: &[&str]) -> StallOptions {
        StallOptions {
            migrations: 3,
            connections: 1,
            request_size: 64,
            pause_ms: 300,
            rtt: rtt.iter().map(|s| s.to_string()).collect(),
            loss: loss.iter().map(|s| s.to_string()).collect(),
            give_up: 10,
        }
    }

    #[test]
    fn the_matrix_and_each_paths_load_arguments() {
        let paths = opts(&["0.1ms", "20ms"], &["0", "1%"]).paths().unwrap();
        let labels: Vec<String> = paths.iter().map(PathPoint::label).collect();
        assert_eq!(
            labels,
            [
                "RTT 0.1 ms (lab), loss 0%",
                "RTT 0.1 ms (lab), loss 1%",
                "RTT 20 ms, loss 0%",
                "RTT 20 ms, loss 1%"
            ]
        );
        assert!(paths[0].load_args().is_empty());
        assert_eq!(paths[1].load_args(), ["--loss", "1%"]);
        assert_eq!(paths[3].load_args(), ["--rtt", "20ms", "--loss", "1%"]);
        assert_eq!(paths[0].pause(300), Duration::from_millis(300));
        let long = PathPoint {
            rtt_ms: 200.0,
            loss_pct: 0.0,
        };
        assert_eq!(long.pause(300), Duration::from_millis(600));
        assert!(opts(&["fast"], &["0"]).paths().is_err());
        assert!(opts(&["20ms"], &["300%"]).paths().is_err());
    }

    #[test]
    fn the_default_matrix_is_the_issues() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            stall: StallOptions,
        }
        let cli = Cli::parse_from(["x"]);
        assert_eq!(cli.stall.paths().unwrap().len(), 10);
        let cli = Cli::parse_from(["x", "--rtt", "50ms,100ms", "--loss", "2%"]);
        let labels: Vec<String> = cli
            .stall
            .paths()
            .unwrap()
            .iter()
            .map(PathPoint::label)
            .collect();
        assert_eq!(labels, ["RTT 50 ms, loss 2%", "RTT 100 ms, loss 2%"]);
    }

    #[test]
    fn failures_and_added_stall_are_reported() {
        let window = |start: u64, end: u64| Window {
            conn: 0,
            start,
            end,
        };
        // Completions every 20 ms, one 40 ms gap where the first migration was.
        let mut t: Vec<u64> = (0..50).map(|i| i * 20_000).collect();
        t.retain(|&x| !(100_000..140_000).contains(&x) || x == 100_000);
        let completions = HashMap::from([(0usize, t)]);
        let m = |start, ok: bool| Migrated {
            window: window(start, start + 5_000),
            from: "w1".into(),
            to: "w2".into(),
            ok,
            ms: 5.0,
            freeze_ms: 1.0,
            error: if ok {
                String::new()
            } else {
                "c17: timeout: not quiescent yet: 17 ack-eliciting packets are in flight".into()
            },
        };
        let migrated = [m(110_000, true), m(300_000, false)];
        let baseline = [window(500_000, 505_000), window(700_000, 705_000)];
        let summary = serde_json::json!({"requests": 48, "duration_s": 1.0});
        let s = summarize(&summary, &completions, &migrated, &baseline, false);
        assert_eq!((s.made, s.ok, s.missing), (2, 1, 0));
        assert_eq!(max(&s.stall), 40.0);
        assert_eq!(max(&s.base), 20.0);
        assert_eq!(s.added_max(), 20.0);
        assert_eq!(
            s.failures,
            [(
                1,
                "timeout: not quiescent yet: N ack-eliciting packets are in flight".to_string()
            )]
        );
        let path = PathPoint {
            rtt_ms: 20.0,
            loss_pct: 0.0,
        };
        assert!(!s.pass(&path));
        let rows = [
            Row {
                path: path.clone(),
                outcome: Ok(s),
            },
            Row {
                path: PathPoint {
                    rtt_ms: 50.0,
                    loss_pct: 1.0,
                },
                outcome: Err("baton-load exited early".into()),
            },
        ];
        let text = report(&opts(&["20ms"], &["0"]), &Protocol::Demo, &rows);
        eprintln!("{text}");
        assert!(text.contains("RTT 20 ms, loss 0%"), "{text}");
        assert!(text.contains("1/2"), "{text}");
        assert!(text.contains("1x timeout: not quiescent yet"), "{text}");
        assert!(text.contains("FAIL (baton-load exited early)"), "{text}");
        assert!(text.contains(
            "RESULT stall rtt_ms=20 loss_pct=0 migrations=2 ok=1 failed=1 stall_p50_ms=20.00"
        ));
        assert!(text.contains("RESULT stall rtt_ms=50 loss_pct=1 error FAIL"));
        assert!(text.contains("0 of 2 paths PASS"));
    }

    #[test]
    fn the_http3_report_says_so() {
        let rows = [Row {
            path: PathPoint {
                rtt_ms: 0.1,
                loss_pct: 0.0,
            },
            outcome: Err("h3-load exited early".into()),
        }];
        let http3 = Protocol::Http3 {
            h3_load: PathBuf::from("h3-load"),
        };
        let text = report(&opts(&["0.1ms"], &["0"]), &http3, &rows);
        assert!(text.contains("== HTTP/3 live-migration stall"), "{text}");
        assert!(text.contains("GET /bytes/64"), "{text}");
        assert!(text.contains("FAIL (h3-load exited early)"), "{text}");
        assert!(text.contains("RESULT http3-stall rtt_ms=0.1 loss_pct=0 error FAIL"));
        assert!(!text.contains("RESULT stall"), "{text}");
    }
}
