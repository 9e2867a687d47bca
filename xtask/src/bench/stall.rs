//! `cargo xtask bench --only stall`: the stall a client sees while its connection is live-migrated.
//!
//! The netns lab with baton-lb (XDP) and two workers (the demo's set-up); `baton-load` runs a few
//! connections (default one), each a back-to-back request loop (no pause, small requests) that
//! logs every completion's wall-clock time (`--gap-log`). The bench moves a connection to the
//! other worker with `baton migrate`, `--migrations` times (w1 -> w2 -> w1 ..., round robin over
//! the connections), and after each migration, with a pause on either side, waits a window as long
//! as that migration's with nothing happening: the baseline.
//!
//! The stall of a migration is the largest gap between two consecutive completed requests of the
//! migrated connection that overlaps the migration's window (`baton migrate` start to exit, wall
//! clock); the baseline's is the same over its window. Both clocks are the host's wall clock.
//! Target: p99 stall < 5 ms.
use super::e2e::{Lab, max, say, unix_us};
use crate::demo::percentile as pct;
use crate::util::workspace_root;
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

const TAG: &str = "stall";
/// Target: 99th percentile of the per-migration stall.
const TARGET_P99_MS: f64 = 5.0;

#[derive(clap::Args, Clone, Debug)]
pub struct StallOptions {
    /// stall: migrations to make (each moves one connection to the other worker).
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
    /// stall: pause before and after each baseline window, in ms (lets a migration's after-effects,
    /// e.g. the source's 250 ms forwarding, end before the baseline is taken).
    #[arg(
        long = "stall-pause-ms",
        id = "stall-pause-ms",
        value_name = "MS",
        default_value_t = 300
    )]
    pub pause_ms: u64,
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

pub fn run(bins: &Path, opts: &StallOptions) -> Result<()> {
    if opts.connections == 0 || opts.migrations == 0 {
        bail!("--stall-connections and --stall-migrations must be at least 1");
    }
    let started = std::time::Instant::now();
    let mut lab = Lab::up(bins, &workspace_root().join("lab/lb.toml"), Vec::new())?;
    let result = measure(&mut lab, opts);
    if result.is_err() {
        lab.run.show_logs();
    }
    drop(lab); // tear down before the report, so the report is the last thing printed
    let report = result?;
    println!("{report}");
    say(
        TAG,
        format!("done in {:.0} s", started.elapsed().as_secs_f64()),
    );
    Ok(())
}

fn measure(lab: &mut Lab, opts: &StallOptions) -> Result<String> {
    let gap_log = lab.run.state.join("gaps.log");
    let n = opts.connections;
    let args: Vec<String> = [
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
    let load = lab.start_load(TAG, &args)?;
    let locals = lab.wait_ready(TAG, &load, n, Duration::from_secs(60))?;
    say(
        TAG,
        format!(
            "{n} connection(s) up, back-to-back requests of {} bytes",
            opts.request_size
        ),
    );
    std::thread::sleep(Duration::from_secs(1));

    // Which connection key (for `baton migrate`) is which load connection, and where it is.
    let mut keys = vec![String::new(); n];
    let mut worker = vec![String::new(); n];
    for row in lab.conns()? {
        if let Some(&i) = locals.get(&row.remote) {
            keys[i] = row.conn;
            worker[i] = row.worker;
        }
    }
    if let Some(i) = keys.iter().position(String::is_empty) {
        bail!("`baton conns` does not list load connection {i}");
    }

    let pause = Duration::from_millis(opts.pause_ms);
    let mut migrated = Vec::with_capacity(opts.migrations);
    let mut baseline = Vec::with_capacity(opts.migrations);
    for i in 0..opts.migrations {
        lab.run.check_children()?;
        let c = i % n;
        let from = worker[c].clone();
        let to = if from == "w1" { "w2" } else { "w1" }.to_string();
        let start = unix_us();
        let m = lab.run.migrate(&keys[c], &to);
        let end = unix_us();
        if m.ok {
            worker[c] = to.clone();
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
        if done % 10 == 0 || done == opts.migrations {
            let ok: Vec<f64> = migrated.iter().filter(|m| m.ok).map(|m| m.ms).collect();
            say(
                TAG,
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
        for m in migrated.iter().rev().take(1).filter(|m| !m.ok) {
            say(TAG, format!("migration {done} failed: {}", m.error));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    say(TAG, "stopping the load");
    let summary = lab.stop_load(load, Duration::from_secs(30))?;

    let completions = read_gap_log(&gap_log)?;
    Ok(report(opts, &summary, &completions, &migrated, &baseline))
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

fn report(
    opts: &StallOptions,
    s: &serde_json::Value,
    completions: &HashMap<usize, Vec<u64>>,
    migrated: &[Migrated],
    baseline: &[Window],
) -> String {
    let empty = Vec::new();
    let times = |c: usize| completions.get(&c).unwrap_or(&empty);
    let per_migration: Vec<Option<f64>> = migrated
        .iter()
        .map(|m| max_gap_ms(times(m.window.conn), m.window.start, m.window.end))
        .collect();
    let stalls: Vec<f64> = per_migration.iter().flatten().copied().collect();
    let mut worst: Vec<(usize, f64)> = per_migration
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .collect();
    worst.sort_by(|a, b| b.1.total_cmp(&a.1));
    let base: Vec<f64> = baseline
        .iter()
        .filter_map(|w| max_gap_ms(times(w.conn), w.start, w.end))
        .collect();
    let windows: Vec<f64> = migrated
        .iter()
        .map(|m| (m.window.end - m.window.start) as f64 / 1000.0)
        .collect();
    let ok_ms: Vec<f64> = migrated.iter().filter(|m| m.ok).map(|m| m.ms).collect();
    let freeze: Vec<f64> = migrated
        .iter()
        .filter(|m| m.ok)
        .map(|m| m.freeze_ms)
        .collect();
    let failed = migrated.len() - ok_ms.len();
    // Every gap of the whole run: what an ordinary request costs.
    let all_gaps: Vec<f64> = completions
        .values()
        .flat_map(|t| t.windows(2).map(|w| (w[1] - w[0]) as f64 / 1000.0))
        .collect();
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let duration = s["duration_s"].as_f64().unwrap_or(0.0);
    let client_failures = n("failed") + n("connection_errors") + n("counter_breaks");
    let reconnects = n("reconnects");
    let p99 = pct(&stalls, 99.0);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let pass = p99 < TARGET_P99_MS
        && failed == 0
        && client_failures == 0
        && reconnects == 0
        && stalls.len() == migrated.len();

    let mut out = String::new();
    macro_rules! w {
        ($($t:tt)*) => {{ out.push_str(&format!($($t)*)); out.push('\n'); }};
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    w!("");
    w!("== Live-migration stall (client-observed; netns lab, XDP baton-lb, two workers) ==");
    w!(
        "load       {} connection(s), back-to-back requests of {} B, {} requests in {:.1} s ({:.0}/s); machine load average {}",
        opts.connections,
        opts.request_size,
        n("requests"),
        duration,
        n("requests") as f64 / duration.max(1e-9),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    w!(
        "ordinary   gap between two completions over the whole run: p50 {:.3} ms, p99 {:.3} ms, max {:.1} ms ({} gaps)",
        pct(&all_gaps, 50.0),
        pct(&all_gaps, 99.0),
        max(&all_gaps),
        all_gaps.len()
    );
    w!(
        "migrations {} made, {} ok, {} failed; baton migrate total_ms p50 {:.1} ms, p99 {:.1} ms; window (process start to exit) p50 {:.1} ms, p99 {:.1} ms",
        migrated.len(),
        ok_ms.len(),
        failed,
        pct(&ok_ms, 50.0),
        pct(&ok_ms, 99.0),
        pct(&windows, 50.0),
        pct(&windows, 99.0)
    );
    w!(
        "freeze     source: migrate_out request to export done (freeze_ms: token check, connection lookup, quiesce, export) p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(&freeze, 50.0),
        pct(&freeze, 99.0),
        max(&freeze)
    );
    w!("");
    w!(
        "{:<34} {:>7} {:>9} {:>9} {:>9}",
        "largest gap per window (ms)",
        "windows",
        "p50",
        "p99",
        "max"
    );
    w!(
        "{:<34} {:>7} {:>9.2} {:>9.2} {:>9.2}",
        "stall: during a migration",
        stalls.len(),
        pct(&stalls, 50.0),
        p99,
        max(&stalls)
    );
    w!(
        "{:<34} {:>7} {:>9.2} {:>9.2} {:>9.2}",
        "baseline: same length, no migration",
        base.len(),
        pct(&base, 50.0),
        pct(&base, 99.0),
        max(&base)
    );
    w!(
        "{:<34} {:>7} {:>8.1}x {:>8.1}x {:>8.1}x",
        "ratio stall / baseline",
        "",
        ratio(pct(&stalls, 50.0), pct(&base, 50.0)),
        ratio(p99, pct(&base, 99.0)),
        ratio(max(&stalls), max(&base))
    );
    w!("");
    w!(
        "worst      {}",
        worst
            .iter()
            .take(5)
            .map(|&(i, st)| {
                let m = &migrated[i];
                format!(
                    "#{} {}->{} stall {st:.1} ms (migrate {:.1} ms, freeze {:.1} ms)",
                    i + 1,
                    m.from,
                    m.to,
                    m.ms,
                    m.freeze_ms
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    for m in migrated.iter().filter(|m| !m.ok).take(5) {
        w!("failed     {} -> {}: {}", m.from, m.to, m.error);
    }
    if stalls.len() < migrated.len() {
        w!(
            "missing    {} migration window(s) had no completed request after them",
            migrated.len() - stalls.len()
        );
    }
    w!(
        "client     {} failed requests, {} connection errors, {} session-counter breaks, {} reconnects, {} packets declared lost",
        n("failed"),
        n("connection_errors"),
        n("counter_breaks"),
        reconnects,
        n("lost_packets")
    );
    w!(
        "target     p99 stall < {TARGET_P99_MS} ms (and no failed migration, request or reconnect): {}",
        if pass { "PASS" } else { "FAIL" }
    );
    w!(
        "RESULT stall migrations={} failed={failed} stall_p50_ms={:.2} stall_p99_ms={:.2} stall_max_ms={:.2} baseline_p50_ms={:.2} baseline_p99_ms={:.2} baseline_max_ms={:.2} {}",
        migrated.len(),
        pct(&stalls, 50.0),
        p99,
        max(&stalls),
        pct(&base, 50.0),
        pct(&base, 99.0),
        max(&base),
        if pass { "PASS" } else { "FAIL" }
    );
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
}
