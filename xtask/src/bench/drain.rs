//! `cargo xtask bench --only drain`: how many idle connections per second `baton drain` moves.
//!
//! The netns lab with baton-lb (XDP) and two workers (the demo's set-up), but baton-lb starts
//! with a config that lists only w1, so the Maglev table holds only w1 and every client Initial
//! lands there. `baton-load --idle` opens `--drain-connections` connections (handshake, one
//! request to prove each, then only keep-alives). Then w2 joins baton-lb's config (SIGHUP
//! reload), and `baton drain w1 --to w2 --concurrency C` is timed. Afterwards: `baton conns` must
//! show every connection on w2, and every connection must answer one more request on the
//! connection it started with (no reconnect). Target: >= 1000 connections/s.
use super::e2e::{Lab, probe, say};
use crate::util::workspace_root;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const TAG: &str = "drain";
/// Target rate of a drain, connections per second.
const TARGET_RATE: f64 = 1000.0;
/// The config baton-lb runs with during the drain bench (first w1 only, then both workers).
const LB_CONFIG: &str = "/run/baton/bench-drain-lb.toml";

#[derive(clap::Args, Clone, Debug)]
pub struct DrainOptions {
    /// drain: idle connections opened on w1 and drained to w2.
    #[arg(
        long = "drain-connections",
        id = "drain-connections",
        value_name = "N",
        default_value_t = 1000
    )]
    pub connections: usize,
    /// drain: migrations in flight at once (`baton drain --concurrency`).
    #[arg(
        long = "drain-concurrency",
        id = "drain-concurrency",
        value_name = "N",
        default_value_t = 16
    )]
    pub concurrency: usize,
}

pub fn run(bins: &Path, opts: &DrainOptions) -> Result<()> {
    if opts.connections == 0 || opts.concurrency == 0 {
        bail!("--drain-connections and --drain-concurrency must be at least 1");
    }
    let started = Instant::now();
    let full = std::fs::read_to_string(workspace_root().join("lab/lb.toml"))
        .context("reading lab/lb.toml")?;
    let config = PathBuf::from(LB_CONFIG);
    std::fs::create_dir_all(config.parent().expect("has a parent"))?;
    std::fs::write(&config, crate::lab::without_workers(&full, &["w2"])?)?;
    let mut lab = Lab::up(bins, &config, vec![config.clone()], false)?;
    let result = measure(&mut lab, opts, &config, &full);
    if result.is_err() {
        lab.run.show_logs();
    }
    drop(lab);
    let report = result?;
    println!("{report}");
    say(
        TAG,
        format!("done in {:.0} s", started.elapsed().as_secs_f64()),
    );
    Ok(())
}

/// `baton-load` arguments for `n` idle connections (handshake, one request to prove each, then
/// only keep-alives), opened 1 ms apart.
pub(super) fn idle_load_args(n: usize) -> Vec<String> {
    [
        "--idle",
        "--connections",
        &n.to_string(),
        "--ramp",
        "1ms",
        "--connect-timeout",
        "10s",
        "--request-timeout",
        "15s",
        "--progress-interval",
        "10s",
    ]
    .map(String::from)
    .to_vec()
}

/// Worker names baton-lb knows, with their Maglev slots.
fn lb_workers(lab: &Lab) -> Result<Vec<(String, u64)>> {
    let v = lab.baton_json(&["workers"])?;
    Ok(v.as_array()
        .context("`baton workers --json` is not an array")?
        .iter()
        .filter(|w| w["in_use"] != false)
        .map(|w| {
            (
                w["name"].as_str().unwrap_or("?").to_string(),
                w["maglev_slots"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

/// What `baton drain` printed and how long it took.
struct Drained {
    wall_s: f64,
    /// When the last migration reported done (before the CID-retirement wait), seconds.
    last_migration_s: Option<f64>,
    moved: Option<u64>,
    total: Option<u64>,
    failed: Option<u64>,
    total_ms: Option<f64>,
    overrides_left: Option<u64>,
    summary: String,
    failures: Vec<String>,
    exit_ok: bool,
}

fn measure(lab: &mut Lab, opts: &DrainOptions, config: &Path, full: &str) -> Result<String> {
    let n = opts.connections;
    let workers = lb_workers(lab)?;
    say(
        TAG,
        format!("baton-lb workers (name, Maglev slots): {workers:?}"),
    );
    if workers.iter().any(|(w, _)| w == "w2") {
        bail!("w2 is in baton-lb's table although the bench config left it out");
    }

    let args = idle_load_args(n);
    let t = Instant::now();
    let load = lab.start_load(TAG, &args)?;
    let locals = lab.wait_ready(TAG, &load, n, Duration::from_secs(150))?;
    say(
        TAG,
        format!(
            "{} idle connections up (handshake + one request each) in {:.1} s",
            locals.len(),
            t.elapsed().as_secs_f64()
        ),
    );

    // w2 joins baton-lb (reload), so the drain can flip overrides to it.
    std::fs::write(config, full)?;
    let pid = lab.lb_pid().context("baton-lb is not running")?;
    // SAFETY: kill(2) on the baton-lb child we started.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        lab.run.check_children()?;
        if lb_workers(lab)?.iter().any(|(w, _)| w == "w2") {
            break;
        }
        if Instant::now() > deadline {
            bail!("w2 did not join baton-lb within 20 s of the SIGHUP reload");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    say(TAG, format!("w2 joined baton-lb: {:?}", lb_workers(lab)?));

    let t = Instant::now();
    let before = lab.conns()?;
    let list_ms = t.elapsed().as_secs_f64() * 1000.0;
    let on_w1 = before.iter().filter(|r| r.worker == "w1").count();
    let on_w2 = before.len() - on_w1;
    say(
        TAG,
        format!(
            "before: {on_w1} connections on w1, {on_w2} on w2 (`baton conns` took {list_ms:.0} ms)"
        ),
    );
    let ours: HashSet<&String> = locals.keys().collect();
    let listed_w1: HashSet<&String> = before
        .iter()
        .filter(|r| r.worker == "w1")
        .map(|r| &r.remote)
        .collect();
    if on_w2 > 0 || listed_w1 != ours {
        bail!(
            "expected all {n} load connections on w1 before the drain, found {on_w1} on w1 \
             ({} of them ours) and {on_w2} on w2",
            listed_w1.intersection(&ours).count()
        );
    }
    let cids: Vec<f64> = before.iter().map(|r| r.cids as f64).collect();
    let probes = Probes::measure(lab)?;
    say(
        TAG,
        format!("controller round trips (mean): {}", probes.line()),
    );
    std::thread::sleep(Duration::from_secs(1));

    say(
        TAG,
        format!(
            "$ baton drain w1 --to w2 --concurrency {} ({n} connections)",
            opts.concurrency
        ),
    );
    let d = timed_drain(lab, opts.concurrency, n)?;
    say(TAG, format!("baton drain: {}", d.summary.trim()));

    // Verification: where they are, and that each answers on its original connection.
    let after = lab.conns()?;
    let after_w2: HashSet<&String> = after
        .iter()
        .filter(|r| r.worker == "w2")
        .map(|r| &r.remote)
        .collect();
    let left_w1 = after.iter().filter(|r| r.worker == "w1").count();
    let ours_on_w2 = after_w2.intersection(&ours).count();
    let overrides = lab
        .baton_json(&["override", "list"])
        .ok()
        .and_then(|v| v.as_array().map(Vec::len));
    say(
        TAG,
        "stopping the load: every connection makes one more request",
    );
    let summary = lab.stop_load(load, Duration::from_secs(60))?;
    Ok(report(
        opts, &d, &summary, ours_on_w2, left_w1, overrides, list_ms, &cids, &probes,
    ))
}

/// What single controller round trips cost while the idle connections sit on w1.
struct Probes {
    info_w1: Vec<f64>,
    info_w2: Vec<f64>,
    lb_workers: Vec<f64>,
    conns_w1: Vec<f64>,
}

impl Probes {
    fn measure(lab: &Lab) -> Result<Probes> {
        let state = &lab.run.state;
        let lb = Path::new(crate::demo::LB_SOCKET);
        Ok(Probes {
            info_w1: probe(&state.join("w1.sock"), r#"{"cmd":"info"}"#, 100)?,
            info_w2: probe(&state.join("w2.sock"), r#"{"cmd":"info"}"#, 100)?,
            lb_workers: probe(lb, r#"{"cmd":"workers"}"#, 100)?,
            conns_w1: probe(&state.join("w1.sock"), r#"{"cmd":"conns"}"#, 5)?,
        })
    }

    fn line(&self) -> String {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        format!(
            "worker `info` {:.2} ms (w1) / {:.2} ms (w2), baton-lb request {:.2} ms, w1 `conns` (all its connections) {:.1} ms",
            mean(&self.info_w1),
            mean(&self.info_w2),
            mean(&self.lb_workers),
            mean(&self.conns_w1)
        )
    }
}

/// Runs `baton drain w1 --to w2`, relaying its progress; the wall time is the command's.
fn timed_drain(lab: &mut Lab, concurrency: usize, n: usize) -> Result<Drained> {
    let mut cmd = lab.run.baton();
    cmd.args(["drain", "w1", "--to", "w2", "--concurrency"])
        .arg(concurrency.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("running baton drain")?;
    let mut stdout = child.stdout.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let mut last_migration_s = None;
    let mut failures = Vec::new();
    let mut last_note = 0usize;
    for line in BufReader::new(child.stderr.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        // `[done/total] migrated` every 25, `[done/total] failed (kind): error` for each failure.
        let done = line
            .strip_prefix('[')
            .and_then(|l| l.split('/').next())
            .and_then(|d| d.parse::<usize>().ok());
        if line.contains("failed") {
            if failures.len() < 10 {
                say(TAG, &line);
            }
            failures.push(line.clone());
        }
        if let Some(done) = done {
            let at = t0.elapsed().as_secs_f64();
            if done >= n {
                last_migration_s = Some(at);
            }
            if done >= last_note + 100 || done >= n {
                last_note = done;
                say(
                    TAG,
                    format!(
                        "{done}/{n} migrated at {at:.1} s ({:.0} connections/s so far)",
                        done as f64 / at.max(1e-9)
                    ),
                );
            }
        } else if !line.contains("failed") {
            eprintln!("{line}");
        }
    }
    let status = child.wait()?;
    let wall_s = t0.elapsed().as_secs_f64();
    let summary = out_reader.join().unwrap_or_default();
    // "drained w1: M of T connections moved, F failed, in X ms (R connections/s); L overrides left"
    let line = summary
        .lines()
        .find(|l| l.starts_with("drained "))
        .unwrap_or("");
    let word_before = |w: &str| -> Option<f64> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let i = words
            .iter()
            .position(|x| x.trim_end_matches([',', ';']) == w)?;
        words.get(i.checked_sub(1)?)?.parse().ok()
    };
    let word_after = |w: &str| -> Option<f64> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let i = words.iter().position(|x| *x == w)?;
        words.get(i + 1)?.parse().ok()
    };
    Ok(Drained {
        wall_s,
        last_migration_s,
        moved: word_before("of").map(|x| x as u64),
        total: word_after("of").map(|x| x as u64),
        failed: word_before("failed").map(|x| x as u64),
        total_ms: word_after("in"),
        overrides_left: word_before("overrides").map(|x| x as u64),
        summary,
        failures,
        exit_ok: status.success(),
    })
}

#[allow(clippy::too_many_arguments)]
fn report(
    opts: &DrainOptions,
    d: &Drained,
    s: &Value,
    ours_on_w2: usize,
    left_w1: usize,
    overrides: Option<usize>,
    list_ms: f64,
    cids: &[f64],
    probes: &Probes,
) -> String {
    let n = opts.connections;
    let num = |k: &str| s[k].as_u64().unwrap_or(0);
    let moved = d.moved.unwrap_or(0);
    // The drain rate: connections moved per second of moving them (baton drain's own "in X ms",
    // from the first migration request to the last one's release). Process start-up, the
    // listing before and the wait for the clients to retire old CIDs after are shown apart.
    let moving_s = d.total_ms.map_or(d.wall_s, |ms| ms / 1000.0);
    let rate = moved as f64 / moving_s.max(1e-9);
    let reconnects = num("reconnects");
    let final_ok = num("final_requests_ok") as usize;
    let client_failures = num("failed") + num("connection_errors") + num("counter_breaks");
    let verified = ours_on_w2 == n && final_ok == n && reconnects == 0 && client_failures == 0;
    let pass = rate >= TARGET_RATE && verified && d.exit_ok && moved as usize == n;
    let mut out = String::new();
    macro_rules! w {
        ($($t:tt)*) => {{ out.push_str(&format!($($t)*)); out.push('\n'); }};
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    w!("");
    w!("== Drain of idle connections (netns lab, XDP baton-lb, two workers) ==");
    w!(
        "setup      {n} idle connections (baton-load --idle), all on w1; `baton drain w1 --to w2 --concurrency {}`; machine load average {}",
        opts.concurrency,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    w!(
        "drain      {} of {} moved, {} failed, exit {}",
        moved,
        d.total.map_or("?".into(), |t| t.to_string()),
        d.failed.map_or("?".into(), |f| f.to_string()),
        if d.exit_ok { "0" } else { "non-zero" }
    );
    w!(
        "time       moving {:.2} s: {:.0} connections/s; process wall {:.2} s ({:.0}/s, with start-up, listing and the wait for CID retirement), last migration seen at {}",
        moving_s,
        rate,
        d.wall_s,
        moved as f64 / d.wall_s.max(1e-9),
        d.last_migration_s
            .map_or("?".into(), |t| format!("{t:.2} s")),
    );
    if let Some(l) = d.summary.lines().find(|l| l.contains("per migration:")) {
        w!("latency   {}", l.trim());
    }
    w!(
        "overrides  {} left according to baton drain, {} in the map afterwards",
        d.overrides_left.map_or("?".into(), |o| o.to_string()),
        overrides.map_or("?".into(), |o| o.to_string())
    );
    w!("listing    `baton conns` of {n} connections took {list_ms:.0} ms before the drain");
    let mean_cids = cids.iter().sum::<f64>() / cids.len().max(1) as f64;
    w!(
        "controller per migration: 2 worker round trips (migrate_out, release; each worker's info is asked once), {mean_cids:.1} baton-lb override_set (one per CID) and as many override_del in the retirement wait; measured: {}",
        probes.line()
    );
    for f in d.failures.iter().take(5) {
        w!("failure    {f}");
    }
    w!(
        "verify     {ours_on_w2}/{n} of the load's connections listed on w2, {left_w1} left on w1; {final_ok}/{n} answered a final request on their original connection; {reconnects} reconnects, {} failed requests, {} connection errors",
        num("failed"),
        num("connection_errors")
    );
    w!(
        "target     >= {TARGET_RATE:.0} connections/s with every connection moved and verified: {}",
        if pass { "PASS" } else { "FAIL" }
    );
    w!(
        "RESULT drain connections={n} concurrency={} moved={moved} failed={} moving_s={:.2} wall_s={:.2} conns_per_s={:.0} verified={} reconnects={reconnects} {}",
        opts.concurrency,
        d.failed.map_or("?".into(), |f| f.to_string()),
        moving_s,
        d.wall_s,
        rate,
        if verified { "yes" } else { "no" },
        if pass { "PASS" } else { "FAIL" }
    );
    out
}
