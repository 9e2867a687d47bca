//! `cargo xtask bench --only http3`: baton-worker's HTTP/3 reverse proxy against a stock one.
//!
//! The question (issue 12): what does proxying HTTP/3 through `baton-worker` (`service =
//! "proxy"`: quinn-proto driven by our own loop, so client connections can be frozen and moved)
//! cost against a plain HTTP/3 proxy built the ordinary way, `h3-stock-proxy` (interop/h3-stock:
//! crates.io quinn + h3 + h3-quinn + hyper-util, a tokio task per connection and per request, its
//! own workspace so our quinn-proto patches do not reach it)?
//!
//! Set-up, no root and no netns: one `baton-upstream` (HTTP/1.1 keep-alive) on 127.0.0.1 pinned to
//! core 0; `baton-worker` (proxy, one route to that upstream) and `h3-stock-proxy --upstream` the
//! same upstream, each on a free 127.0.0.1 UDP port, both pinned to core 1 and both running for
//! the whole bench (the one not under load is idle); the same `h3-load` (pinned to core 0, beside
//! the upstream) against each in turn. Same certificate (`baton-worker gen-certs`), ALPN `h3`.
//!
//! The loads (`--http3-loads`), each `--http3-connections` x `--http3-concurrency` request loops:
//! - `small`: every request `GET /bytes/1000` (`h3-load --small-only`): a request-rate load;
//! - `mix`: h3-load's default mix, round robin: `GET /bytes/1000`, `GET /bytes/500000`, `POST
//!   /echo` of 65,536 bytes: a byte-rate load.
//!
//! Each run is `--http3-warmup` s plus a `--http3-seconds` window: h3-load prints a progress line
//! a second (`--progress`), at each the bench reads the proxy's utime+stime and every other
//! process's; requests/s, MB/s and CPU are the differences between the line at the end of the
//! warm-up and the last line before h3-load's deadline. Latency p50/p99 are h3-load's own (nearest
//! rank over every successful request of the run). `--http3-rounds` rounds, each running every load
//! on both proxies, baton first in odd rounds and stock first in even ones; figures are medians over
//! the rounds. Targets: requests/s >= 0.9x stock, and no failed request on baton. A missed target
//! or a failed run is reported in the table, never an error.
use super::e2e::say as say_tag;
use super::worker::{
    DISTURBED_CORES, KillOnDrop, cpu_between, cpu_seconds, fmt_opt, free_udp_port, median,
    other_processes_cpu, pass, udp_port_bound,
};
use crate::util::workspace_root;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TAG: &str = "http3";
const SERVICE_NAME: &str = "h3.test";
/// h3-load's default small GET size (the `small` load and a third of the mix).
const SMALL_BYTES: u64 = 1000;
/// Throughput target: baton >= this x stock.
const TARGET_RATIO: f64 = 0.9;

#[derive(clap::Args, Clone, Debug)]
pub struct Http3Options {
    /// http3: interleaved rounds (each runs every load on baton-worker and on h3-stock-proxy);
    /// figures are medians over the rounds.
    #[arg(
        long = "http3-rounds",
        id = "http3-rounds",
        value_name = "N",
        default_value_t = 5
    )]
    pub rounds: usize,
    /// http3: QUIC connections of h3-load.
    #[arg(
        long = "http3-connections",
        id = "http3-connections",
        value_name = "N",
        default_value_t = 8
    )]
    pub connections: usize,
    /// http3: concurrent request loops per connection.
    #[arg(
        long = "http3-concurrency",
        id = "http3-concurrency",
        value_name = "C",
        default_value_t = 4
    )]
    pub concurrency: usize,
    /// http3: seconds of each run's measured window (after the warm-up).
    #[arg(
        long = "http3-seconds",
        id = "http3-seconds",
        value_name = "S",
        default_value_t = 5
    )]
    pub seconds: u64,
    /// http3: seconds of load before the window opens (upstream pool, congestion windows).
    #[arg(
        long = "http3-warmup",
        id = "http3-warmup",
        value_name = "S",
        default_value_t = 1
    )]
    pub warmup: u64,
    /// http3: loads, comma-separated: small (1000 B GETs only), mix (h3-load's default mix of
    /// 1000 B GET, 500 kB GET, 64 KiB POST /echo).
    #[arg(
        long = "http3-loads",
        id = "http3-loads",
        value_name = "LOAD,LOAD",
        value_enum,
        value_delimiter = ',',
        default_value = "small,mix"
    )]
    pub loads: Vec<H3Load>,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum H3Load {
    /// Every request `GET /bytes/1000`.
    Small,
    /// h3-load's default mix: 1000 B GET, 500 kB GET, 64 KiB POST /echo.
    Mix,
}

impl H3Load {
    fn name(self) -> &'static str {
        match self {
            H3Load::Small => "small",
            H3Load::Mix => "mix",
        }
    }
    fn describe(self) -> String {
        match self {
            H3Load::Small => format!("{SMALL_BYTES} B GETs"),
            H3Load::Mix => "mix 1000 B GET/500 kB GET/64 KiB POST".into(),
        }
    }
}

fn say(msg: impl AsRef<str>) {
    say_tag(TAG, msg);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Baton,
    Stock,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Baton => "baton",
            Side::Stock => "stock",
        }
    }
}

/// The binaries the bench runs.
pub struct Bins {
    pub worker: PathBuf,
    pub upstream: PathBuf,
    pub load: PathBuf,
    pub stock_proxy: PathBuf,
}

/// Builds what is missing (release): baton-worker and baton-upstream from the main workspace
/// unless `bin_dir` has them, and interop/h3-stock (its own workspace, crates.io quinn and h3)
/// into `target/h3-stock`.
pub fn build(bin_dir: Option<&Path>) -> Result<Bins> {
    let main_bins = match bin_dir {
        Some(d) => d.to_path_buf(),
        None => {
            say("building baton-worker and baton-upstream (release)");
            crate::demo::build_release_packages(&["baton-worker", "baton-test-upstream"])?
        }
    };
    say("building interop/h3-stock (release, crates.io quinn + h3 without our patches)");
    let stock = crate::util::build_h3_stock(&workspace_root().join("target").join("h3-stock"))?;
    let bins = Bins {
        worker: main_bins.join("baton-worker"),
        upstream: main_bins.join("baton-upstream"),
        load: stock.join("h3-load"),
        stock_proxy: stock.join("h3-stock-proxy"),
    };
    for b in [&bins.worker, &bins.upstream, &bins.load, &bins.stock_proxy] {
        if !b.exists() {
            bail!("{} is missing", b.display());
        }
    }
    Ok(bins)
}

/// The scratch directory (certificates, config, logs), removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server (upstream or proxy) pinned to a core, killed and reaped on drop.
struct Proc {
    name: &'static str,
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `program args` under `taskset -c core` (taskset execs it, so the child's pid is
    /// the server's), stdout and stderr both into `log`.
    fn start(
        name: &'static str,
        core: u32,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Proc> {
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &core.to_string()])
            .arg(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        Ok(Proc {
            name,
            child,
            pid,
            log,
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
        if tail.is_empty() {
            "(no output)".into()
        } else {
            tail
        }
    }

    /// Fails (with the end of its output) if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its output ends:\n  {}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// Waits until `ready` says so, failing if the process exits first or takes over 10 s.
    fn wait_ready(
        &mut self,
        what: &str,
        mut ready: impl FnMut(&Proc) -> Option<u16>,
    ) -> Result<u16> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited at start ({status}); its output ends:\n  {}",
                    self.name,
                    self.log_tail()
                );
            }
            if let Some(port) = ready(self) {
                return Ok(port);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready within 10 s ({what}); its output ends:\n  {}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The port of the `listening IP:PORT` line the process printed, once it has.
    fn listening_port(&self) -> Option<u16> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("listening "))
            .and_then(|a| a.trim().parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port())
    }
}

/// Everything running for the bench: the upstream and both proxies.
struct Servers {
    upstream: Proc,
    baton: Proc,
    baton_port: u16,
    stock: Proc,
    stock_port: u16,
}

impl Servers {
    fn start(bins: &Bins, dir: &Path) -> Result<Servers> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mut upstream = Proc::start(
            "baton-upstream",
            0,
            &bins.upstream,
            &s(&["--listen", "127.0.0.1:0"]),
            dir.join("upstream.log"),
        )?;
        let upstream_port = upstream.wait_ready("its `listening` line", |p| p.listening_port())?;
        let upstream_addr = format!("127.0.0.1:{upstream_port}");
        say(format!(
            "baton-upstream (pid {}) on {upstream_addr}, core 0",
            upstream.pid
        ));

        let cert = dir.join("service.pem");
        let key = dir.join("service.key");
        let baton_port = free_udp_port()?;
        let config = dir.join("worker.toml");
        std::fs::write(
            &config,
            format!(
                "vip = \"127.0.0.1\"\nport = {baton_port}\nserver_id = 1\ncert = \"{}\"\nkey = \"{}\"\n\
                 service = \"proxy\"\n\n[proxy]\n\n[[proxy.upstreams]]\nname = \"app\"\n\
                 servers = [\"{upstream_addr}\"]\n\n[[proxy.routes]]\nupstream = \"app\"\n",
                cert.display(),
                key.display()
            ),
        )?;
        let mut baton = Proc::start(
            "baton-worker",
            1,
            &bins.worker,
            &["--config".to_string(), config.display().to_string()],
            dir.join("baton-worker.log"),
        )?;
        baton.wait_ready("its UDP socket", |_| {
            udp_port_bound(baton_port).then_some(baton_port)
        })?;
        say(format!(
            "baton-worker (proxy, pid {}) on 127.0.0.1:{baton_port}, core 1",
            baton.pid
        ));

        let mut stock = Proc::start(
            "h3-stock-proxy",
            1,
            &bins.stock_proxy,
            &[
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--cert".into(),
                cert.display().to_string(),
                "--key".into(),
                key.display().to_string(),
                "--upstream".into(),
                upstream_addr.clone(),
            ],
            dir.join("h3-stock-proxy.log"),
        )?;
        let stock_port = stock.wait_ready("its `listening` line", |p| p.listening_port())?;
        say(format!(
            "h3-stock-proxy (pid {}) on 127.0.0.1:{stock_port}, core 1",
            stock.pid
        ));
        // Let both settle (and their process images be the servers, not taskset).
        std::thread::sleep(Duration::from_millis(200));
        Ok(Servers {
            upstream,
            baton,
            baton_port,
            stock,
            stock_port,
        })
    }

    fn side(&mut self, side: Side) -> (&mut Proc, u16) {
        match side {
            Side::Baton => (&mut self.baton, self.baton_port),
            Side::Stock => (&mut self.stock, self.stock_port),
        }
    }

    fn pids(&self) -> Vec<u32> {
        vec![self.upstream.pid, self.baton.pid, self.stock.pid]
    }
}

/// One progress line of h3-load, with the proxy's CPU and every other process's when it came.
#[derive(Clone)]
struct Sample {
    at: Instant,
    elapsed_ms: u64,
    requests: u64,
    bytes: u64,
    cpu_s: f64,
    others: HashMap<u32, f64>,
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
struct Measured {
    requests_per_s: f64,
    mb_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Failed requests over the whole run (h3-load's summary).
    failed: u64,
    /// Proxy CPU per 1,000 requests over the window.
    cpu_ms_per_1k: f64,
    /// Cores the proxy used over the window (1.0: its core was saturated).
    proxy_cores: f64,
    /// Cores other processes (not the proxies, upstream or h3-load) used over the window.
    other_cores: f64,
}

/// Runs h3-load once against `side` and measures its window.
fn load_run(
    bins: &Bins,
    dir: &Path,
    opts: &Http3Options,
    servers: &mut Servers,
    side: Side,
    load: H3Load,
) -> Result<Measured> {
    let skip = servers.pids();
    let (proxy, port) = servers.side(side);
    proxy.check_alive()?;
    let proxy_pid = proxy.pid;
    let duration_ms = (opts.warmup + opts.seconds) * 1000 + 500;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(&bins.load)
        .arg("--connect")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--server-name", SERVICE_NAME])
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .args(["--connections", &opts.connections.to_string()])
        .args(["--concurrency", &opts.concurrency.to_string()])
        .args(["--duration-ms", &duration_ms.to_string()])
        .args(["--small-bytes", &SMALL_BYTES.to_string()])
        .arg("--progress")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if load == H3Load::Small {
        cmd.arg("--small-only");
    }
    let mut child = KillOnDrop(
        cmd.spawn()
            .with_context(|| format!("starting h3-load: {cmd:?}"))?,
    );
    let load_pid = child.0.id();
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let other_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let err_reader = {
        let stderr = child.0.stderr.take().context("h3-load stderr")?;
        let (samples, other_lines) = (samples.clone(), other_lines.clone());
        let ours: Vec<u32> = skip.into_iter().chain([load_pid]).collect();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                let v: Option<Value> = serde_json::from_str(&line).ok();
                match v.as_ref().and_then(|v| {
                    Some((
                        v.get("elapsed_ms")?.as_u64()?,
                        v["requests"].as_u64()?,
                        v["bytes"].as_u64()?,
                    ))
                }) {
                    Some((elapsed_ms, requests, bytes)) => {
                        let at = Instant::now();
                        let cpu_s = cpu_seconds(proxy_pid).unwrap_or(f64::NAN);
                        let others = other_processes_cpu(&ours);
                        samples.lock().unwrap().push(Sample {
                            at,
                            elapsed_ms,
                            requests,
                            bytes,
                            cpu_s,
                            others,
                        });
                    }
                    None => {
                        let mut l = other_lines.lock().unwrap();
                        l.push(line);
                        let n = l.len();
                        if n > 20 {
                            l.drain(..n - 20);
                        }
                    }
                }
            }
        })
    };
    let out_reader = {
        let mut stdout = child.0.stdout.take().context("h3-load stdout")?;
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        })
    };
    // Requests time out after 30 s (h3-load's default): past that something is stuck.
    let deadline = Instant::now() + Duration::from_millis(duration_ms) + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.0.kill();
            bail!(
                "h3-load did not finish within {} s; its stderr ends: {}",
                (duration_ms / 1000) + 60,
                other_lines.lock().unwrap().join(" | ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let _ = err_reader.join();
    let tail = || other_lines.lock().unwrap().join(" | ");
    let summary: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "h3-load ({status}) printed no summary; its stderr ends: {}",
            tail()
        )
    })?;
    // The proxy must still be up (a crash under load is the result, with its log).
    servers.side(side).0.check_alive()?;

    let samples = samples.lock().unwrap().clone();
    let warmup_ms = opts.warmup * 1000;
    let a = samples
        .iter()
        .find(|s| s.elapsed_ms + 500 >= warmup_ms)
        .cloned();
    let b = samples
        .iter()
        .rev()
        .find(|s| s.elapsed_ms <= duration_ms)
        .cloned();
    let (Some(a), Some(b)) = (a, b) else {
        bail!(
            "no progress lines for the window; h3-load's stderr ends: {}",
            tail()
        );
    };
    let wall = (b.at - a.at).as_secs_f64();
    if wall < 0.5 {
        bail!("the load window was only {wall:.2} s long");
    }
    let requests = b.requests.saturating_sub(a.requests) as f64;
    let cpu = b.cpu_s - a.cpu_s;
    let failed = summary["failed"].as_u64().unwrap_or(u64::MAX);
    if failed > 0 {
        let errors = summary["errors"]
            .as_array()
            .map(|e| {
                e.iter()
                    .take(3)
                    .filter_map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .unwrap_or_default();
        say(format!(
            "note: {} {}: {failed} failed requests: {errors}",
            side.name(),
            load.name()
        ));
    }
    let conn_errors = summary["connection_errors"].as_u64().unwrap_or(0);
    if conn_errors > 0 {
        say(format!(
            "note: {} {}: {conn_errors} connection errors, {} reconnects",
            side.name(),
            load.name(),
            summary["reconnects"]
        ));
    }
    Ok(Measured {
        requests_per_s: requests / wall,
        mb_per_s: b.bytes.saturating_sub(a.bytes) as f64 / 1e6 / wall,
        p50_ms: summary["p50_ms"].as_f64().unwrap_or(f64::NAN),
        p99_ms: summary["p99_ms"].as_f64().unwrap_or(f64::NAN),
        failed,
        cpu_ms_per_1k: if requests > 0.0 {
            cpu * 1000.0 / (requests / 1000.0)
        } else {
            f64::NAN
        },
        proxy_cores: cpu / wall,
        other_cores: cpu_between(&a.others, &b.others) / wall,
    })
}

/// The runs of one round, keyed by (load, is baton); None: that run failed.
type Round = HashMap<(H3Load, bool), Option<Measured>>;

pub fn run(bins: &Bins, opts: &Http3Options) -> Result<()> {
    if opts.rounds == 0 || opts.seconds == 0 || opts.connections == 0 || opts.concurrency == 0 {
        bail!(
            "--http3-rounds, --http3-seconds, --http3-connections and --http3-concurrency must be at least 1"
        );
    }
    if opts.loads.is_empty() {
        bail!("--http3-loads names no load");
    }
    let mut loads = opts.loads.clone();
    loads.dedup();
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("baton-bench-http3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let scratch = Scratch(dir.clone());
    crate::util::run(
        Command::new(&bins.worker)
            .arg("gen-certs")
            .arg("--out")
            .arg(&dir)
            .args(["--workers", "w1", "--service-name", SERVICE_NAME])
            .stdout(Stdio::null()),
    )?;
    // Dropped (killed) on every way out of this function, errors and panics included.
    let mut servers = Servers::start(bins, &dir)?;
    say(format!(
        "{} rounds x {} loads ({}); h3-load {} conns x {} loops, {} s warm-up + {} s window; \
         proxies on core 1, upstream and h3-load on core 0",
        opts.rounds,
        loads.len(),
        loads
            .iter()
            .map(|l| l.name())
            .collect::<Vec<_>>()
            .join(", "),
        opts.connections,
        opts.concurrency,
        opts.warmup,
        opts.seconds
    ));
    let mut rounds: Vec<Round> = Vec::new();
    for r in 1..=opts.rounds {
        let mut round = Round::new();
        let order = if r % 2 == 1 {
            [Side::Baton, Side::Stock]
        } else {
            [Side::Stock, Side::Baton]
        };
        for &load in &loads {
            for side in order {
                let m = match load_run(bins, &dir, opts, &mut servers, side, load) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        say(format!("{} {}: FAILED: {e:#}", side.name(), load.name()));
                        // A proxy that died cannot serve the rest: restart everything.
                        if servers.baton.check_alive().is_err()
                            || servers.stock.check_alive().is_err()
                            || servers.upstream.check_alive().is_err()
                        {
                            say("a server exited: restarting the upstream and both proxies");
                            drop(servers);
                            servers = Servers::start(bins, &dir)?;
                        }
                        None
                    }
                };
                round.insert((load, side == Side::Baton), m);
            }
        }
        say(format!(
            "round {r}/{}: {} ({:.0} s so far)",
            opts.rounds,
            round_line(&round, &loads),
            started.elapsed().as_secs_f64()
        ));
        rounds.push(round);
    }
    drop(servers);
    println!("{}", report(&rounds, &loads, opts));
    drop(scratch);
    say(format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    Ok(())
}

fn get(round: &Round, load: H3Load, baton: bool) -> Option<&Measured> {
    round.get(&(load, baton)).and_then(|m| m.as_ref())
}

fn round_line(round: &Round, loads: &[H3Load]) -> String {
    let mut parts = Vec::new();
    let mut other: f64 = 0.0;
    for &load in loads {
        let f = |baton: bool, f: fn(&Measured) -> f64, d: usize| {
            fmt_opt(get(round, load, baton).map(f), d)
        };
        parts.push(format!(
            "{} req/s {}/{} p99 ms {}/{} proxy cores {}/{}",
            load.name(),
            f(true, |m| m.requests_per_s, 0),
            f(false, |m| m.requests_per_s, 0),
            f(true, |m| m.p99_ms, 2),
            f(false, |m| m.p99_ms, 2),
            f(true, |m| m.proxy_cores, 2),
            f(false, |m| m.proxy_cores, 2),
        ));
        for baton in [true, false] {
            if let Some(m) = get(round, load, baton) {
                other = other.max(m.other_cores);
            }
        }
    }
    let mut line = format!("baton/stock {}", parts.join("; "));
    if other > DISTURBED_CORES {
        line.push_str(&format!(
            "; DISTURBED: other processes used up to {other:.2} cores during a window"
        ));
    }
    line
}

/// Medians over the rounds of `f` for one load and side.
fn med(rounds: &[Round], load: H3Load, baton: bool, f: fn(&Measured) -> f64) -> Option<f64> {
    median(
        rounds
            .iter()
            .filter_map(|r| get(r, load, baton).map(f))
            .collect(),
    )
}

fn ratio(b: Option<f64>, s: Option<f64>) -> Option<f64> {
    match (b, s) {
        (Some(b), Some(s)) if s != 0.0 => Some(b / s),
        _ => None,
    }
}

fn report(rounds: &[Round], loads: &[H3Load], opts: &Http3Options) -> String {
    let n = rounds.len();
    let mut rows: Vec<[String; 6]> = Vec::new();
    let mut results: Vec<String> = Vec::new();
    for &load in loads {
        let b_rps = med(rounds, load, true, |m| m.requests_per_s);
        let s_rps = med(rounds, load, false, |m| m.requests_per_s);
        let r_rps = ratio(b_rps, s_rps);
        let rps_verdict = match r_rps {
            Some(r) => pass(r >= TARGET_RATIO),
            None if b_rps.is_none() => "FAIL".into(),
            None => "n/a".into(),
        };
        rows.push([
            format!(
                "{}: {} conns x {} loops, {}: requests/s",
                load.name(),
                opts.connections,
                opts.concurrency,
                load.describe()
            ),
            fmt_opt(b_rps, 0),
            fmt_opt(s_rps, 0),
            fmt_opt(r_rps, 2),
            format!(">= {TARGET_RATIO}x stock"),
            rps_verdict.clone(),
        ]);
        let info = |rows: &mut Vec<[String; 6]>, name: &str, f: fn(&Measured) -> f64, d: usize| {
            let (b, s) = (med(rounds, load, true, f), med(rounds, load, false, f));
            rows.push([
                format!("  {name}"),
                fmt_opt(b, d),
                fmt_opt(s, d),
                fmt_opt(ratio(b, s), 2),
                "(info)".into(),
                String::new(),
            ]);
            (b, s)
        };
        if load == H3Load::Mix {
            info(&mut rows, "response MB/s", |m| m.mb_per_s, 1);
        }
        let (b50, s50) = info(&mut rows, "latency p50 ms", |m| m.p50_ms, 2);
        let (b99, s99) = info(&mut rows, "latency p99 ms", |m| m.p99_ms, 2);
        info(
            &mut rows,
            "proxy CPU ms per 1k requests",
            |m| m.cpu_ms_per_1k,
            1,
        );
        info(
            &mut rows,
            "proxy cores used (1.00 = core 1 saturated)",
            |m| m.proxy_cores,
            2,
        );
        // Failed requests: summed over the rounds; a run that failed outright counts too.
        let failed = |baton: bool| {
            let runs = rounds
                .iter()
                .filter(|r| get(r, load, baton).is_some())
                .count();
            let sum: u64 = rounds
                .iter()
                .filter_map(|r| get(r, load, baton))
                .map(|m| m.failed)
                .sum();
            (sum, n - runs)
        };
        let ((bf, bruns), (sf, sruns)) = (failed(true), failed(false));
        let show = |f: u64, lost: usize| {
            if lost == 0 {
                f.to_string()
            } else {
                format!("{f} (+{lost} runs failed)")
            }
        };
        let failed_ok = bf == 0 && bruns == 0;
        rows.push([
            "  failed requests (all rounds)".into(),
            show(bf, bruns),
            show(sf, sruns),
            String::new(),
            "baton 0".into(),
            pass(failed_ok),
        ]);
        let ok = rps_verdict == "PASS" && failed_ok;
        results.push(format!(
            "RESULT http3 load={} connections={} concurrency={} rounds={n} baton_rps={} stock_rps={} ratio={} \
             baton_p50_ms={} baton_p99_ms={} stock_p50_ms={} stock_p99_ms={} baton_failed={bf} stock_failed={sf} \
             target_ratio={TARGET_RATIO} {}",
            load.name(),
            opts.connections,
            opts.concurrency,
            fmt_opt(b_rps, 0),
            fmt_opt(s_rps, 0),
            fmt_opt(r_rps, 3),
            fmt_opt(b50, 3),
            fmt_opt(b99, 3),
            fmt_opt(s50, 3),
            fmt_opt(s99, 3),
            pass(ok)
        ));
    }
    let head = ["", "baton", "stock", "ratio", "target", ""];
    let mut widths = [0usize; 6];
    for r in rows
        .iter()
        .map(|r| r.each_ref().map(|s| s.as_str()))
        .chain([head])
    {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |r: [&str; 6]| {
        format!(
            "{:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}  {:<w4$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4],
        )
    };
    let mut out = format!(
        "http3 bench: baton-worker (service proxy) vs h3-stock-proxy (quinn 0.11 + h3 0.0.8), same baton-upstream \
         (medians of {n} rounds, {} s windows; proxies on core 1, upstream and h3-load on core 0)\n",
        opts.seconds
    );
    let disturbed: Vec<String> = rounds
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.values()
                .flatten()
                .any(|m| m.other_cores > DISTURBED_CORES)
        })
        .map(|(i, _)| (i + 1).to_string())
        .collect();
    if !disturbed.is_empty() {
        out.push_str(&format!(
            "WARNING: other processes used more than {DISTURBED_CORES} cores during load windows of round(s) {}: those figures are disturbed\n",
            disturbed.join(", ")
        ));
    }
    out.push_str(&line(head));
    out.push('\n');
    for r in &rows {
        out.push_str(line(r.each_ref().map(|s| s.as_str())).trim_end());
        out.push('\n');
    }
    for r in results {
        out.push_str(&r);
        out.push('\n');
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(rps: f64, failed: u64) -> Measured {
        Measured {
            requests_per_s: rps,
            p50_ms: 1.0,
            p99_ms: 5.0,
            failed,
            ..Default::default()
        }
    }

    fn opts() -> Http3Options {
        Http3Options {
            rounds: 3,
            connections: 8,
            concurrency: 4,
            seconds: 5,
            warmup: 1,
            loads: vec![H3Load::Small],
        }
    }

    #[test]
    fn report_judges_the_median_ratio_and_failures() {
        let rounds: Vec<Round> = [(950.0, 1000.0), (900.0, 1000.0), (1000.0, 1000.0)]
            .into_iter()
            .map(|(b, s)| {
                Round::from([
                    ((H3Load::Small, true), Some(measured(b, 0))),
                    ((H3Load::Small, false), Some(measured(s, 2))),
                ])
            })
            .collect();
        let text = report(&rounds, &[H3Load::Small], &opts());
        assert!(text.contains("RESULT http3 load=small"), "{text}");
        assert!(
            text.contains("baton_rps=950 stock_rps=1000 ratio=0.950"),
            "{text}"
        );
        assert!(text.contains("baton_failed=0 stock_failed=6"), "{text}");
        assert!(text.trim_end().ends_with("PASS"), "{text}");

        let mut failing = rounds.clone();
        failing[0].insert((H3Load::Small, true), Some(measured(950.0, 1)));
        let text = report(&failing, &[H3Load::Small], &opts());
        assert!(text.trim_end().ends_with("FAIL"), "{text}");

        let mut slow = rounds;
        for r in &mut slow {
            r.insert((H3Load::Small, true), Some(measured(800.0, 0)));
        }
        let text = report(&slow, &[H3Load::Small], &opts());
        assert!(text.contains("ratio=0.800"), "{text}");
        assert!(text.trim_end().ends_with("FAIL"), "{text}");
    }
}
