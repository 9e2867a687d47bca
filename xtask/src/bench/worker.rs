//! `cargo xtask bench --only worker`: `baton-worker` against a stock quinn server, same load.
//!
//! Issue 14 asks whether the worker (quinn-proto driven by our own loop, so connections can be
//! frozen and moved) costs anything against the ordinary way of serving QUIC: crates.io quinn
//! with a task per connection and per stream (`benches/stock-quinn`, its own workspace so our
//! quinn-proto patches do not reach it). Both serve the demo protocol (docs/DEMO-PROTOCOL.md)
//! with the same certificate, ALPN, cipher suites and socket buffers (the worker's default
//! `socket_buffer`, 4 MiB), on 127.0.0.1 at a free port, the server pinned to core 1 and
//! `baton-load` to core 0 (`taskset`). Each run starts a fresh server process, so the RSS figures
//! (VmHWM, VmRSS in /proc/PID/status) belong to that run alone.
//!
//! The loads, in `--worker-rounds` interleaved rounds (baton then stock for each load):
//! - 32 connections, 64 B requests back to back (`--request-interval 0`, no long stream):
//!   requests/s and server CPU ms per 1,000 requests;
//! - 4 connections each with a long echo stream, 100 MB/s offered in all (`--stream-rate` is per
//!   connection), requests only every second: echoed MB/s and server CPU s per GB echoed;
//! - the same at `--worker-flood-rate` (default 1000 MB/s, more than either server echoes on one
//!   core): echoed MB/s, CPU s per GB, the server's RSS peak, and whether every stream came back
//!   byte-exact (baton-load's summary);
//! - fairness: one connection floods (its own baton-load at `--worker-flood-rate`) while 8 others
//!   send 64 B requests back to back: their requests/s and request latency p99, and whether the
//!   flood stayed byte-exact;
//! - `--worker-idle` idle connections (`baton-load --idle`): (RSS once all are up - RSS before)
//!   / connections.
//!
//! The load window: baton-load prints a progress line every second; at each line the bench reads
//! the server's utime+stime (/proc/PID/stat). The window runs from the line at `--worker-warmup`
//! seconds to the last line, and rates and CPU are the differences between those two lines, so
//! neither the handshakes nor the drain after the stop count. Figures are medians over the
//! rounds; the targets (issue 14) compare them with the stock median. A missed target or a failed
//! run is reported in the table, never an error.
use super::e2e::say as say_tag;
use crate::demo::percentile;
use crate::util::workspace_root;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TAG: &str = "worker";
/// Connections of the request row and their body size.
const REQUEST_CONNECTIONS: usize = 32;
const REQUEST_SIZE: usize = 64;
/// Connections (one long stream each) of the stream rows, and the moderate offered rate in all.
const STREAM_CONNECTIONS: usize = 4;
const STREAM_RATE_MBPS: u64 = 100;
/// Connections sending requests beside the one flooding connection of the fair load.
const FAIR_CONNECTIONS: usize = 8;
/// The worker's default `socket_buffer` (worker/src/config.rs), given to the stock server too.
const SOCKET_BUFFER: usize = 4 << 20;
const SERVICE_NAME: &str = "localhost";

#[derive(clap::Args, Clone, Debug)]
pub struct WorkerOptions {
    /// worker: interleaved rounds (each runs every load on baton-worker, then on stock quinn);
    /// figures are medians over the rounds.
    #[arg(
        long = "worker-rounds",
        id = "worker-rounds",
        value_name = "N",
        default_value_t = 5
    )]
    pub rounds: usize,
    /// worker: seconds of each run's load window (after the warm-up), where rates and CPU are
    /// measured.
    #[arg(
        long = "worker-seconds",
        id = "worker-seconds",
        value_name = "S",
        default_value_t = 5
    )]
    pub seconds: u64,
    /// worker: seconds of load before the window opens (handshakes, congestion windows opening).
    #[arg(
        long = "worker-warmup",
        id = "worker-warmup",
        value_name = "S",
        default_value_t = 2
    )]
    pub warmup: u64,
    /// worker: idle connection counts, comma-separated (one idle run per count per server and
    /// round: RSS per connection). Empty to skip.
    #[arg(
        long = "worker-idle",
        id = "worker-idle",
        value_name = "N,N",
        value_delimiter = ',',
        default_value = "1000,10000"
    )]
    pub idle: Vec<usize>,
    /// worker: offered rate of the saturating stream row, MB/s in all (split over the streams).
    #[arg(
        long = "worker-flood-rate",
        id = "worker-flood-rate",
        value_name = "MBPS",
        default_value_t = 1000
    )]
    pub flood_rate: u64,
}

fn say(msg: impl AsRef<str>) {
    say_tag(TAG, msg);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Server {
    Baton,
    Stock,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Baton => "baton",
            Server::Stock => "stock",
        }
    }
}

/// What the bench needs on disk: the binaries, certificates, a scratch directory.
struct Setup {
    worker: PathBuf,
    load: PathBuf,
    stock: PathBuf,
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Setup {
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn cert(&self) -> PathBuf {
        self.dir.join("service.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("service.key")
    }
}

/// Builds the stock quinn server (release, its own workspace and lock file) into
/// `target/stock-quinn`; returns the binary.
fn build_stock() -> Result<PathBuf> {
    say("building benches/stock-quinn (release, crates.io quinn without our patches)");
    let root = workspace_root();
    let target = root.join("target").join("stock-quinn");
    crate::util::run(
        crate::util::cargo()
            .args(["build", "--release", "--manifest-path"])
            .arg(root.join("benches/stock-quinn/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target),
    )?;
    Ok(target.join("release").join("stock-quinn"))
}

/// A running server, killed on drop.
struct Running {
    child: Child,
    pid: u32,
    port: u16,
    log: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(setup: &Setup, server: Server, tag: &str) -> Result<Running> {
        let port = free_udp_port()?;
        let log = setup.dir.join(format!("{}-{tag}.log", server.name()));
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "1"]);
        match server {
            Server::Baton => {
                let config = setup.dir.join("worker.toml");
                std::fs::write(
                    &config,
                    format!(
                        "vip = \"127.0.0.1\"\nport = {port}\nserver_id = 1\ncert = \"{}\"\nkey = \"{}\"\n\
                         service = \"demo\"\nsocket_buffer = {SOCKET_BUFFER}\n",
                        setup.cert().display(),
                        setup.key().display()
                    ),
                )?;
                cmd.arg(&setup.worker).arg("--config").arg(&config);
            }
            Server::Stock => {
                cmd.arg(&setup.stock)
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{port}"))
                    .arg("--cert")
                    .arg(setup.cert())
                    .arg("--key")
                    .arg(setup.key())
                    .arg("--socket-buffer")
                    .arg(SOCKET_BUFFER.to_string());
            }
        }
        let out = std::fs::File::create(&log)?;
        // taskset execs the server, so the child's pid is the server's.
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id();
        let mut running = Running {
            child,
            pid,
            port,
            log,
        };
        // Up once its socket is bound (and its process image is the server, not taskset).
        crate::demo::wait_until(Duration::from_secs(10), "the server's socket", || {
            if let Some(status) = running.child.try_wait()? {
                bail!(
                    "{} exited at start ({status}): {}",
                    server.name(),
                    running.log_tail()
                );
            }
            Ok(udp_port_bound(port))
        })?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(running)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// A `Vm*` line of /proc/PID/status, in bytes.
    fn status_bytes(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = text.lines().find(|l| l.starts_with(field))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}

pub(super) fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether something has a UDP socket bound to 127.0.0.1:`port` (/proc/net/udp).
pub(super) fn udp_port_bound(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp")
        .map(|t| {
            t.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

/// utime + stime of `pid` (all its threads), in seconds.
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// utime + stime of every process but `skip` (and this one), per pid, in seconds: what else
/// runs on the machine. Kernel threads count too (kworkers), except ksoftirqd, which on loopback
/// does the benchmark's own packet processing when softirqs pile up.
pub(super) fn other_processes_cpu(skip: &[u32]) -> std::collections::HashMap<u32, f64> {
    let me = std::process::id();
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || skip.contains(&pid) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.starts_with("ksoftirqd") {
            continue;
        }
        if let Some(cpu) = cpu_seconds(pid) {
            out.insert(pid, cpu);
        }
    }
    out
}

/// CPU the processes in `end` used since `start` (a process new in `end` started in between).
pub(super) fn cpu_between(
    start: &std::collections::HashMap<u32, f64>,
    end: &std::collections::HashMap<u32, f64>,
) -> f64 {
    end.iter()
        .map(|(pid, e)| (e - start.get(pid).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

/// One progress line of baton-load, with the server's CPU when it arrived.
#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    t: f64,
    up: usize,
    requests: u64,
    verified_mb: f64,
    cpu_s: f64,
    /// Every other process's CPU (see [`other_processes_cpu`]).
    others: std::collections::HashMap<u32, f64>,
}

/// Parses `[load] t=   3.0s up=32/32 requests=... stream sent=..MB verified=..MB ...`.
fn parse_progress(line: &str) -> Option<(f64, usize, u64, f64)> {
    let rest = line.strip_prefix("[load] t=")?.trim_start();
    let t: f64 = rest.split('s').next()?.parse().ok()?;
    let field = |name: &str| -> Option<&str> {
        let i = line.find(name)? + name.len();
        line[i..].split([' ', '/']).next()
    };
    let up = field(" up=")?.parse().ok()?;
    let requests = field(" requests=")?.parse().ok()?;
    let verified = field(" verified=")?.strip_suffix("MB")?.parse().ok()?;
    Some((t, up, requests, verified))
}

/// What one loaded run measured over its window.
#[derive(Clone, Debug, Default)]
struct Loaded {
    requests_per_s: f64,
    cpu_ms_per_1k: f64,
    mb_per_s: f64,
    cpu_s_per_gb: f64,
    rss_peak: u64,
    exact: bool,
    /// 99th percentile of the run's request latencies (baton-load's summary), ms.
    request_p99_ms: f64,
    /// Cores' worth of CPU used by other processes than the server and baton-load during the
    /// window: anything much above 0 means the figures are disturbed.
    other_cores: f64,
}

/// Runs baton-load with `args` against `server` for warm-up + window, sampling the server's CPU
/// at each progress line.
fn loaded_run(
    setup: &Setup,
    opts: &WorkerOptions,
    server: &Running,
    connections: usize,
    args: &[String],
    beside: Option<u32>,
) -> Result<Loaded> {
    let total = opts.warmup + opts.seconds;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(&setup.load)
        .arg("--target")
        .arg(format!("127.0.0.1:{}", server.port))
        .arg("--ca")
        .arg(setup.ca())
        .args(["--server-name", SERVICE_NAME])
        .args(["--connections", &connections.to_string()])
        .args(["--ramp", "0ms", "--progress-interval", "1s", "--json"])
        // Half a second past the last progress line the window uses.
        .args(["--duration", &format!("{}ms", total * 1000 + 500)])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let other = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let stderr = child.stderr.take().context("baton-load stderr")?;
        let (samples, other, pid, load_pid) =
            (samples.clone(), other.clone(), server.pid, child.id());
        // A second baton-load running beside this one (the fair load's flood) is ours too.
        let ours: Vec<u32> = [pid, load_pid].into_iter().chain(beside).collect();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                match parse_progress(&line) {
                    Some((t, up, requests, verified_mb)) => {
                        let at = Instant::now();
                        let cpu_s = cpu_seconds(pid).unwrap_or(f64::NAN);
                        let others = other_processes_cpu(&ours);

                        samples.lock().unwrap().push(Sample {
                            at,
                            t,
                            up,
                            requests,
                            verified_mb,
                            cpu_s,
                            others,
                        });
                    }
                    None => other.lock().unwrap().push(line),
                }
            }
        })
    };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .context("baton-load stdout")?
        .read_to_string(&mut stdout)?;
    let status = child.wait()?;
    let _ = reader.join();
    let rss_peak = server.status_bytes("VmHWM:").unwrap_or(0);
    let summary: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "baton-load ({status}) printed no summary; its stderr ends: {}",
            other.lock().unwrap().join(" | ")
        )
    })?;
    let samples = samples.lock().unwrap().clone();
    let start = samples
        .iter()
        .find(|s| s.t + 0.5 >= opts.warmup as f64 && s.up == connections)
        .cloned();
    let end = samples.last().cloned();
    let (Some(a), Some(b)) = (start, end) else {
        bail!("no progress line after the warm-up (connections not all up?)");
    };
    let wall = (b.at - a.at).as_secs_f64();
    if wall < 0.5 {
        bail!("the load window was only {wall:.2} s long");
    }
    let cpu = b.cpu_s - a.cpu_s;
    let requests = (b.requests - a.requests) as f64;
    let mb = b.verified_mb - a.verified_mb;
    let exact = summary["streams_not_exact"].as_u64() == Some(0)
        && summary["stream_bytes_sent"] == summary["stream_bytes_verified"]
        && summary["established"].as_u64() == Some(connections as u64);
    if !exact && args.iter().any(|a| a == "--stream-rate") {
        let why = summary["per_connection"]
            .as_array()
            .and_then(|c| c.iter().find_map(|c| c["last_error"].as_str()))
            .unwrap_or("no error reported");
        say(format!("note: the long streams were not byte-exact: {why}"));
    }
    Ok(Loaded {
        requests_per_s: requests / wall,
        cpu_ms_per_1k: if requests > 0.0 {
            cpu * 1000.0 / (requests / 1000.0)
        } else {
            f64::NAN
        },
        mb_per_s: mb / wall,
        cpu_s_per_gb: if mb > 0.0 {
            cpu / (mb / 1000.0)
        } else {
            f64::NAN
        },
        rss_peak,
        exact,
        request_p99_ms: summary["request_p99_ms"].as_f64().unwrap_or(f64::NAN),
        other_cores: cpu_between(&a.others, &b.others) / wall,
    })
}

/// The fair load: one connection floods (a long stream at `--worker-flood-rate`, on its own
/// baton-load) while [`FAIR_CONNECTIONS`] others send requests back to back; the figures are the
/// requests' (rate, p99 latency) and `exact` says the flood came back byte-exact. Both clients
/// share core 0, the server has core 1, so the flood takes the share of the server that the
/// scheduling of connections gives it: the question is whether that share is the same as stock's.
fn fair_run(setup: &Setup, opts: &WorkerOptions, server: &Running) -> Result<Loaded> {
    let total_ms = (2 * opts.warmup + opts.seconds) * 1000 + 1500;
    let mut flood = Command::new("taskset");
    flood
        .args(["-c", "0"])
        .arg(&setup.load)
        .arg("--target")
        .arg(format!("127.0.0.1:{}", server.port))
        .arg("--ca")
        .arg(setup.ca())
        .args(["--server-name", SERVICE_NAME, "--connections", "1"])
        .args(["--ramp", "0ms", "--progress-interval", "0", "--json"])
        .args(["--duration", &format!("{total_ms}ms")])
        .args(["--stream-rate", &(opts.flood_rate * 1_000_000).to_string()])
        .args(["--request-interval", "1s", "--request-timeout", "30s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut flood = KillOnDrop(
        flood
            .spawn()
            .with_context(|| format!("starting {flood:?}"))?,
    );
    // The flood's congestion window opens before the requests start.
    std::thread::sleep(Duration::from_secs(opts.warmup));
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut loaded = loaded_run(
        setup,
        opts,
        server,
        FAIR_CONNECTIONS,
        &s(&[
            "--request-size",
            &REQUEST_SIZE.to_string(),
            "--request-interval",
            "0ms",
            "--stream-rate",
            "0",
        ]),
        Some(flood.0.id()),
    )?;
    let mut out = String::new();
    flood
        .0
        .stdout
        .take()
        .context("flood stdout")?
        .read_to_string(&mut out)?;
    let status = flood.0.wait()?;
    let summary: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("the flooding baton-load ({status}) printed no summary"))?;
    loaded.exact = summary["ok"].as_bool() == Some(true)
        && summary["stream_bytes_verified"].as_u64().unwrap_or(0) > 0;
    if !loaded.exact {
        say("note: the flood beside the requests was not byte-exact or failed");
    }
    Ok(loaded)
}

/// A child process killed (and reaped) if the run ends early.
pub(super) struct KillOnDrop(pub(super) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `n` idle connections: (RSS once all are up - RSS before) / n, in bytes.
fn idle_run(setup: &Setup, server: &Running, n: usize) -> Result<f64> {
    let before = server.status_bytes("VmRSS:").context("reading VmRSS")?;
    let stop = setup.dir.join(format!("stop-idle-{n}"));
    let _ = std::fs::remove_file(&stop);
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(&setup.load)
        .arg("--target")
        .arg(format!("127.0.0.1:{}", server.port))
        .arg("--ca")
        .arg(setup.ca())
        .args(["--server-name", SERVICE_NAME])
        .args([
            "--connections",
            &n.to_string(),
            "--idle",
            "--print-conn-ids",
        ])
        // ~5 s of connection set-up whatever n (the default 2 ms would take 20 s for 10,000).
        .args([
            "--ramp",
            &format!("{}us", (5_000_000 / n.max(1)).clamp(50, 2000)),
        ])
        .args(["--progress-interval", "0", "--json"])
        .arg("--stop-file")
        .arg(&stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let stderr_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let err_reader = {
        let stderr = child.stderr.take().context("baton-load stderr")?;
        let lines = stderr_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                let mut l = lines.lock().unwrap();
                l.push(line);
                let len = l.len();
                if len > 20 {
                    l.drain(..len - 20);
                }
            }
        })
    };
    // stdout: `conn` lines, `ready connections=n`, then the JSON summary.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out_reader = {
        let stdout = child.stdout.take().context("baton-load stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
    };
    let limit = Duration::from_secs(60 + n as u64 / 100);
    let deadline = Instant::now() + limit;
    let mut ready = false;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.starts_with("ready connections=") => {
                ready = true;
                break;
            }
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait()?.is_some() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    // Let the last handshakes' leftovers (retransmission buffers, acks) settle.
    std::thread::sleep(Duration::from_secs(1));
    let after = server.status_bytes("VmRSS:").context("reading VmRSS")?;
    std::fs::write(&stop, b"")?;
    let finish = Instant::now() + Duration::from_secs(30 + n as u64 / 200);
    let mut summary = None;
    while Instant::now() < finish {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.starts_with('{') => {
                summary = serde_json::from_str::<Value>(&line).ok();
                break;
            }
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    if summary.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    let _ = out_reader.join();
    let _ = err_reader.join();
    let tail = || stderr_lines.lock().unwrap().join(" | ");
    if !ready {
        bail!(
            "not all {n} idle connections came up within {} s; baton-load's stderr ends: {}",
            limit.as_secs(),
            tail()
        );
    }
    if let Some(s) = &summary {
        let established = s["established"].as_u64().unwrap_or(0);
        let reconnects = s["reconnects"].as_u64().unwrap_or(0);
        if established != n as u64 || reconnects > 0 {
            say(format!(
                "note: idle {n}: {established} established, {reconnects} reconnects, {} final requests ok",
                s["final_requests_ok"]
            ));
        }
    }
    Ok((after as f64 - before as f64) / n as f64)
}

/// The figures of one server in one round (None: that run failed).
#[derive(Default, Clone)]
struct Round {
    requests: Option<Loaded>,
    stream: Option<Loaded>,
    flood: Option<Loaded>,
    /// Requests beside a flooding connection; `exact` is the flood's.
    fair: Option<Loaded>,
    idle: Vec<Option<f64>>,
}

/// Cores of other processes' CPU above which a run counts as disturbed.
pub(super) const DISTURBED_CORES: f64 = 0.15;

impl Round {
    /// The most CPU other processes used during any of this round's load windows, in cores.
    fn other_cores(&self) -> f64 {
        [&self.requests, &self.stream, &self.flood, &self.fair]
            .into_iter()
            .flatten()
            .map(|l| l.other_cores)
            .fold(0.0, f64::max)
    }
}

fn attempt<T>(what: &str, server: Server, f: impl FnOnce() -> Result<T>) -> Option<T> {
    match f() {
        Ok(v) => Some(v),
        Err(e) => {
            say(format!("{} {what}: FAILED: {e:#}", server.name()));
            None
        }
    }
}

/// The loads of a round, in the order they run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    Requests,
    Stream,
    Flood,
    Fair,
    Idle,
}

/// Runs one load on a fresh `server`; the figures land in the matching field of a [`Round`].
fn run_load(setup: &Setup, opts: &WorkerOptions, server: Server, load: Load) -> Round {
    let mut round = Round::default();
    let loaded = |what: &str, conns: usize, args: Vec<String>| {
        attempt(what, server, || {
            let running = Running::start(setup, server, what)?;
            let r = loaded_run(setup, opts, &running, conns, &args, None);
            if r.is_err() {
                say(format!("{} log: {}", server.name(), running.log_tail()));
            }
            r
        })
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match load {
        Load::Requests => {
            round.requests = loaded(
                "requests",
                REQUEST_CONNECTIONS,
                s(&[
                    "--request-size",
                    &REQUEST_SIZE.to_string(),
                    "--request-interval",
                    "0ms",
                    "--stream-rate",
                    "0",
                ]),
            )
        }
        Load::Stream | Load::Flood => {
            let total = if load == Load::Stream {
                STREAM_RATE_MBPS
            } else {
                opts.flood_rate
            };
            let per_conn = total * 1_000_000 / STREAM_CONNECTIONS as u64;
            let r = loaded(
                if load == Load::Stream {
                    "stream"
                } else {
                    "flood"
                },
                STREAM_CONNECTIONS,
                s(&[
                    "--stream-rate",
                    &per_conn.to_string(),
                    "--request-size",
                    &REQUEST_SIZE.to_string(),
                    "--request-interval",
                    "1s",
                    // The echo of a flooded stream may lag by seconds: let requests wait.
                    "--request-timeout",
                    "30s",
                ]),
            );
            if load == Load::Stream {
                round.stream = r;
            } else {
                round.flood = r;
            }
        }
        Load::Fair => {
            round.fair = attempt("fair", server, || {
                let running = Running::start(setup, server, "fair")?;
                let r = fair_run(setup, opts, &running);
                if r.is_err() {
                    say(format!("{} log: {}", server.name(), running.log_tail()));
                }
                r
            })
        }
        Load::Idle => {
            for &n in &opts.idle {
                round.idle.push(attempt(&format!("idle {n}"), server, || {
                    let running = Running::start(setup, server, &format!("idle{n}"))?;
                    idle_run(setup, &running, n)
                }));
            }
        }
    }
    round
}

fn merge(into: &mut Round, from: Round) {
    into.requests = into.requests.take().or(from.requests);
    into.stream = into.stream.take().or(from.stream);
    into.flood = into.flood.take().or(from.flood);
    into.fair = into.fair.take().or(from.fair);
    if !from.idle.is_empty() {
        into.idle = from.idle;
    }
}

pub fn run(bins: &Path, opts: &WorkerOptions) -> Result<()> {
    if opts.rounds == 0 || opts.seconds == 0 {
        bail!("--worker-rounds and --worker-seconds must be at least 1");
    }
    let started = Instant::now();
    let stock = build_stock()?;
    let dir = std::env::temp_dir().join(format!("baton-bench-worker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let setup = Setup {
        worker: bins.join("baton-worker"),
        load: bins.join("baton-load"),
        stock,
        dir,
    };
    for b in [&setup.worker, &setup.load, &setup.stock] {
        if !b.exists() {
            bail!("{} is missing", b.display());
        }
    }
    crate::util::run(
        Command::new(&setup.worker)
            .arg("gen-certs")
            .arg("--out")
            .arg(&setup.dir)
            .args(["--workers", "w1", "--service-name", SERVICE_NAME])
            .stdout(Stdio::null()),
    )?;
    raise_fd_limit(opts);
    say(format!(
        "{} rounds; per run {} s warm-up + {} s window; idle {:?}; server on core 1, baton-load on core 0",
        opts.rounds, opts.warmup, opts.seconds, opts.idle
    ));

    let mut rounds: Vec<(Round, Round)> = Vec::new();
    let mut loads = vec![Load::Requests, Load::Stream, Load::Flood, Load::Fair];
    if !opts.idle.is_empty() {
        loads.push(Load::Idle);
    }
    for r in 1..=opts.rounds {
        let (mut baton, mut stock) = (Round::default(), Round::default());
        for &load in &loads {
            merge(&mut baton, run_load(&setup, opts, Server::Baton, load));
            merge(&mut stock, run_load(&setup, opts, Server::Stock, load));
        }
        say(format!(
            "round {r}/{}: {} ({:.0} s so far)",
            opts.rounds,
            round_line(&baton, &stock, opts),
            started.elapsed().as_secs_f64()
        ));
        rounds.push((baton, stock));
    }
    println!("{}", report(&rounds, opts));
    say(format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    Ok(())
}

/// baton-load opens a UDP socket per connection: 10,000 idle connections need more descriptors
/// than the usual soft limit of 1024. Raise ours (inherited by the children) to the hard limit.
fn raise_fd_limit(opts: &WorkerOptions) {
    let want = opts.idle.iter().copied().max().unwrap_or(0) as u64 + 1024;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    if lim.rlim_cur < want {
        say(format!(
            "warning: open files limit {} < {want}: the largest idle run may fail (raise `ulimit -Hn`)",
            lim.rlim_cur
        ));
    }
}

pub(super) fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "n/a".into(),
    }
}

fn round_line(b: &Round, s: &Round, opts: &WorkerOptions) -> String {
    let pair = |f: &dyn Fn(&Round) -> Option<f64>, d: usize| {
        format!("{}/{}", fmt_opt(f(b), d), fmt_opt(f(s), d))
    };
    let mut line = format!(
        "baton/stock req/s {}, stream MB/s {}, flood MB/s {}, req p99 ms beside a flood {}",
        pair(&|r| r.requests.as_ref().map(|l| l.requests_per_s), 0),
        pair(&|r| r.stream.as_ref().map(|l| l.mb_per_s), 1),
        pair(&|r| r.flood.as_ref().map(|l| l.mb_per_s), 1),
        pair(&|r| r.fair.as_ref().map(|l| l.request_p99_ms), 2),
    );
    for (i, n) in opts.idle.iter().enumerate() {
        line.push_str(&format!(
            ", idle {n} KiB/conn {}",
            pair(&|r| r.idle.get(i).copied().flatten().map(|b| b / 1024.0), 1)
        ));
    }
    let other = b.other_cores().max(s.other_cores());
    if other > DISTURBED_CORES {
        line.push_str(&format!(
            "; DISTURBED: other processes used up to {other:.2} cores during a load window"
        ));
    }
    line
}

pub(super) fn median(values: Vec<f64>) -> Option<f64> {
    let v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        None
    } else {
        Some(percentile(&v, 50.0))
    }
}

/// How a row's baton median is judged against the stock median.
enum Target {
    /// baton >= factor x stock.
    AtLeast(f64),
    /// baton <= factor x stock.
    AtMost(f64),
    /// baton's figure <= this value.
    Below(f64, &'static str),
}

/// One row of the table: name, baton median, stock median, ratio, target, verdict.
fn row(
    rounds: &[(Round, Round)],
    name: String,
    f: &dyn Fn(&Round) -> Option<f64>,
    digits: usize,
    target: Target,
) -> [String; 6] {
    let med = |baton: bool| {
        median(
            rounds
                .iter()
                .filter_map(|(b, s)| f(if baton { b } else { s }))
                .collect(),
        )
    };
    let (b, s) = (med(true), med(false));
    let ratio = match (b, s) {
        (Some(b), Some(s)) if s != 0.0 => Some(b / s),
        _ => None,
    };
    // No ratio: a failed baton figure fails, a failed stock one cannot be judged.
    let judge = |ok: bool| match ratio {
        Some(_) => pass(ok),
        None if b.is_none() => "FAIL".into(),
        None => "n/a".into(),
    };
    let r = ratio.unwrap_or(f64::NAN);
    let (target_text, verdict) = match target {
        Target::AtLeast(k) => (format!(">= {k}x stock"), judge(r >= k)),
        Target::AtMost(k) if k == 1.0 => ("<= stock".into(), judge(r <= k)),
        Target::AtMost(k) => (format!("<= {k}x stock"), judge(r <= k)),
        Target::Below(limit, t) => (
            t.to_string(),
            b.map_or_else(|| "FAIL".into(), |b| pass(b <= limit)),
        ),
    };
    [
        name,
        fmt_opt(b, digits),
        fmt_opt(s, digits),
        ratio
            .map(|r| format!("{r:.2}"))
            .unwrap_or_else(|| "n/a".into()),
        target_text,
        verdict,
    ]
}

/// A row counting the runs whose `pick` came back byte-exact (counts, not medians).
fn exact_row(
    rounds: &[(Round, Round)],
    name: &str,
    pick: fn(&Round) -> Option<&Loaded>,
) -> [String; 6] {
    let exact = |baton: bool| {
        rounds
            .iter()
            .filter_map(|(b, s)| pick(if baton { b } else { s }))
            .filter(|l| l.exact)
            .count()
    };
    let (b, s, n) = (exact(true), exact(false), rounds.len());
    [
        name.into(),
        format!("{b}/{n}"),
        format!("{s}/{n}"),
        "".into(),
        "every run".into(),
        pass(b == n),
    ]
}

fn report(rounds: &[(Round, Round)], opts: &WorkerOptions) -> String {
    let mut rows: Vec<[String; 6]> = Vec::new();
    let add = |rows: &mut Vec<[String; 6]>,
               name: String,
               f: &dyn Fn(&Round) -> Option<f64>,
               digits: usize,
               target: Target| {
        rows.push(row(rounds, name, f, digits, target));
    };
    let rc = REQUEST_CONNECTIONS;
    let sc = STREAM_CONNECTIONS;
    add(
        &mut rows,
        format!("{rc} conns x {REQUEST_SIZE} B requests: requests/s"),
        &|r| r.requests.as_ref().map(|l| l.requests_per_s),
        0,
        Target::AtLeast(0.9),
    );
    add(
        &mut rows,
        "  server CPU ms per 1k requests".into(),
        &|r| r.requests.as_ref().map(|l| l.cpu_ms_per_1k),
        2,
        Target::AtMost(1.1),
    );
    for (label, rate, pick) in [
        (
            "stream",
            STREAM_RATE_MBPS,
            (|r: &Round| r.stream.clone()) as fn(&Round) -> Option<Loaded>,
        ),
        ("flood", opts.flood_rate, |r: &Round| r.flood.clone()),
    ] {
        add(
            &mut rows,
            format!("{sc} streams at {rate} MB/s offered: echoed MB/s"),
            &|r| pick(r).map(|l| l.mb_per_s),
            1,
            Target::AtLeast(0.9),
        );
        add(
            &mut rows,
            "  server CPU s per GB".into(),
            &|r| pick(r).map(|l| l.cpu_s_per_gb),
            2,
            Target::AtMost(1.1),
        );
        if label == "flood" {
            add(
                &mut rows,
                "  server RSS peak MiB (VmHWM)".into(),
                &|r| pick(r).map(|l| l.rss_peak as f64 / (1 << 20) as f64),
                1,
                // The bench's worker runs with the default [limits]: 256 MiB memory_budget.
                Target::Below(256.0, "<= limits.memory_budget (256 MiB)"),
            );
        }
    }
    rows.push(exact_row(rounds, "  flood runs byte-exact", |r| {
        r.flood.as_ref()
    }));
    let fc = FAIR_CONNECTIONS;
    add(
        &mut rows,
        format!("{fc} conns' requests beside 1 flooding conn: requests/s"),
        &|r| r.fair.as_ref().map(|l| l.requests_per_s),
        0,
        Target::AtLeast(0.9),
    );
    add(
        &mut rows,
        "  request latency p99 ms".into(),
        &|r| r.fair.as_ref().map(|l| l.request_p99_ms),
        2,
        Target::AtMost(1.1),
    );
    rows.push(exact_row(rounds, "  floods beside them byte-exact", |r| {
        r.fair.as_ref()
    }));
    for (i, n) in opts.idle.iter().enumerate() {
        add(
            &mut rows,
            format!("{n} idle conns: RSS KiB per connection"),
            &|r| r.idle.get(i).copied().flatten().map(|b| b / 1024.0),
            2,
            Target::AtMost(1.0),
        );
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
        "worker bench: baton-worker vs stock quinn {} (medians of {} rounds, {} s windows; server on core 1, load on core 0)\n",
        "0.11",
        rounds.len(),
        opts.seconds
    );
    let disturbed: Vec<String> = rounds
        .iter()
        .enumerate()
        .filter(|(_, (b, s))| b.other_cores().max(s.other_cores()) > DISTURBED_CORES)
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
    out
}

pub(super) fn pass(ok: bool) -> String {
    if ok { "PASS" } else { "FAIL" }.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_progress_line() {
        let l = "[load] t=   3.0s up=32/32 requests=1234 (411/s) failed=0 reconnects=0 conn_errors=0 \
                 max_stall=1.2ms stream sent=10.50MB verified=9.25MB bad=0";
        assert_eq!(parse_progress(l), Some((3.0, 32, 1234, 9.25)));
        assert_eq!(parse_progress("baton-load: SIGINT, stopping"), None);
    }

    #[test]
    fn reads_own_cpu() {
        assert!(cpu_seconds(std::process::id()).is_some());
    }
}
