//! Migration snapshot benchmarks: runs the criterion bench (benches/benches/migration.rs), then
//! `openssl speed -evp aes-256-gcm` in the same run as the AES-GCM ceiling, and prints medians,
//! GB/s, the seed's claimed figures with our speedup, and the target as pass/fail.
//!
//! `BATON_BENCH_MEASUREMENT_SECS=1` shortens criterion's measurement time (default 3 s per case).
use crate::util::{self, cargo, workspace_root};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;

const SIZES: [(&str, f64); 3] = [
    ("1KiB", 1024.0),
    ("1MiB", 1_048_576.0),
    ("10MiB", 10_485_760.0),
];
/// The seed's table (seconds) at 1 KB / 1 MB / 10 MB.
const SEED_ENCRYPTION: [f64; 3] = [10e-6, 1e-3, 10e-3];
const SEED_WORKFLOW: [f64; 3] = [100e-6, 10e-3, 100e-3];
/// Target: the round trip (seal + open) at least this much faster than the seed's workflow.
const TARGET_SPEEDUP: f64 = 5.0;

pub fn run() -> Result<()> {
    let mut bench = cargo();
    bench.args(["bench", "-p", "baton-benches", "--bench", "migration", "--"]);
    if let Ok(secs) = std::env::var("BATON_BENCH_MEASUREMENT_SECS") {
        bench.args(["--measurement-time", &secs, "--warm-up-time", "1"]);
    }
    util::run(&mut bench)?;
    let ceiling = OpensslCeiling::measure();
    let criterion = criterion_dir();
    let median = |group: &str, bench: &str, size: &str| {
        read_median_seconds(&criterion.join(group).join(bench).join(size))
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    println!();
    println!(
        "== Migration snapshot envelope (criterion medians; data: alternating 1 KiB blocks of random bytes and JSON-like records) =="
    );
    println!(
        "machine load average during the run: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("criterion results: {}", criterion.display());

    println!("\n-- AES-256-GCM (aes-gcm crate) vs openssl speed -evp aes-256-gcm (ceiling) --");
    println!(
        "{:<6} {:<5} {:>11} {:>8} {:>10} {:>8} {:>13} {:>9}",
        "size", "op", "median", "GB/s", "seed", "speedup", "openssl GB/s", "of ceil"
    );
    for (i, (size, bytes)) in SIZES.iter().enumerate() {
        for op in ["seal", "open"] {
            let t = median("migration_encryption", op, size)?;
            let gbps = bytes / t / 1e9;
            let (seed, speedup) = if op == "seal" {
                (
                    fmt_time(SEED_ENCRYPTION[i]),
                    format!("{:.1}x", SEED_ENCRYPTION[i] / t),
                )
            } else {
                ("-".into(), "-".into())
            };
            let (ceil, pct) = match ceiling.for_size(*bytes) {
                Some(c) => (format!("{c:.2}"), format!("{:.0}%", gbps / c * 100.0)),
                None => ("n/a".into(), "-".into()),
            };
            println!(
                "{size:<6} {op:<5} {:>11} {gbps:>8.2} {seed:>10} {speedup:>8} {ceil:>13} {pct:>9}",
                fmt_time(t)
            );
        }
    }

    println!(
        "\n-- Snapshot envelope (encode/decode: the plaintext encoding; seal = encode + encrypt in place; open = decrypt in place + decode) --"
    );
    println!(
        "{:<6} {:>11} {:>11} {:>11} {:>8} {:>11} {:>8} {:>11} {:>8} {:>10} {:>8} {:>12}",
        "size",
        "encode",
        "decode",
        "seal",
        "GB/s",
        "open",
        "GB/s",
        "round trip",
        "GB/s",
        "seed",
        "speedup",
        "target >=5x"
    );
    let mut all_pass = true;
    for (i, (size, bytes)) in SIZES.iter().enumerate() {
        let t = |op: &str| median("migration_envelope", op, size);
        let (enc, dec, seal, open, trip) = (
            t("encode")?,
            t("decode")?,
            t("seal")?,
            t("open")?,
            t("round_trip")?,
        );
        let speedup = SEED_WORKFLOW[i] / trip;
        let pass = speedup >= TARGET_SPEEDUP;
        all_pass &= pass;
        println!(
            "{size:<6} {:>11} {:>11} {:>11} {:>8.2} {:>11} {:>8.2} {:>11} {:>8.2} {:>10} {:>7.1}x {:>12}",
            fmt_time(enc),
            fmt_time(dec),
            fmt_time(seal),
            bytes / seal / 1e9,
            fmt_time(open),
            bytes / open / 1e9,
            fmt_time(trip),
            bytes / trip / 1e9,
            fmt_time(SEED_WORKFLOW[i]),
            speedup,
            if pass { "PASS" } else { "FAIL" }
        );
    }
    println!(
        "\ntarget (round trip >= {TARGET_SPEEDUP}x faster than the seed's workflow at every size): {}",
        if all_pass { "PASS" } else { "FAIL" }
    );
    ceiling.print();
    Ok(())
}

/// Where criterion wrote its results: `$CARGO_TARGET_DIR/criterion` or `target/criterion`.
fn criterion_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    };
    target.join("criterion")
}

/// The median point estimate from criterion's `new/estimates.json`, in seconds.
fn read_median_seconds(bench_dir: &std::path::Path) -> Result<f64> {
    let path = bench_dir.join("new").join("estimates.json");
    let json = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (did the criterion bench run, and is CARGO_TARGET_DIR the same as for the bench?)", path.display()))?;
    let nanos = json_number_after(&json, "\"median\"", "\"point_estimate\":")
        .with_context(|| format!("no median point_estimate in {}", path.display()))?;
    Ok(nanos / 1e9)
}

/// The number following `field` after the first `section` in `json` (enough for criterion's
/// flat estimates file; xtask keeps no JSON dependency).
fn json_number_after(json: &str, section: &str, field: &str) -> Option<f64> {
    let rest = &json[json.find(section)? + section.len()..];
    let rest = rest[rest.find(field)? + field.len()..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn fmt_time(seconds: f64) -> String {
    match seconds {
        s if s < 1e-6 => format!("{:.0} ns", s * 1e9),
        s if s < 1e-3 => format!("{:.2} us", s * 1e6),
        s if s < 1.0 => format!("{:.2} ms", s * 1e3),
        s => format!("{s:.2} s"),
    }
}

/// `openssl speed -evp aes-256-gcm` throughput per block size, bytes per second.
struct OpensslCeiling {
    by_block: Vec<(f64, f64)>,
    error: Option<String>,
}

impl OpensslCeiling {
    fn measure() -> Self {
        let mut by_block = Vec::new();
        let mut error = None;
        // Default block sizes (16 B .. 16 KiB), then 1 MiB blocks for the large states.
        for extra in [&[][..], &["-bytes", "1048576"][..]] {
            match run_openssl(extra) {
                Ok(rows) => by_block.extend(rows),
                Err(e) => error = Some(format!("{e:#}")),
            }
        }
        Self { by_block, error }
    }

    /// GB/s at the largest measured block not above `bytes` (1 KiB -> 1024 B blocks,
    /// 1 and 10 MiB -> 1 MiB blocks).
    fn for_size(&self, bytes: f64) -> Option<f64> {
        self.by_block
            .iter()
            .filter(|(block, _)| *block <= bytes)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, bps)| bps / 1e9)
    }

    fn print(&self) {
        println!("\n-- openssl speed -evp aes-256-gcm (same run) --");
        for (block, bps) in &self.by_block {
            println!("block {:>8} B: {:>6.2} GB/s", block, bps / 1e9);
        }
        if let Some(e) = &self.error {
            println!("openssl: {e}");
        }
    }
}

fn run_openssl(extra: &[&str]) -> Result<Vec<(f64, f64)>> {
    let mut cmd = Command::new("openssl");
    cmd.args(["speed", "-evp", "aes-256-gcm", "-seconds", "1", "-mr"])
        .args(extra);
    eprintln!("[xtask] $ {cmd:?}");
    let out = cmd
        .output()
        .context("running openssl (install it, e.g. `apt-get install openssl`)")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl speed failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    parse_openssl_mr(&String::from_utf8_lossy(&out.stdout))
}

/// Machine-readable output: `+H:16:64:...` block sizes, `+F:n:AES-256-GCM:bps:bps:...`.
fn parse_openssl_mr(text: &str) -> Result<Vec<(f64, f64)>> {
    let fields = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map(|l| l.split(':').map(str::to_owned).collect::<Vec<_>>())
    };
    let header = fields("+H:").context("no +H: line in openssl speed -mr output")?;
    let rates = fields("+F:").context("no +F: line in openssl speed -mr output")?;
    let blocks = header[1..].iter().filter_map(|b| b.parse::<f64>().ok());
    let rates = rates[3..].iter().filter_map(|r| r.parse::<f64>().ok());
    Ok(blocks.zip(rates).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_criterion_and_openssl_output() {
        let est = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0},"point_estimate":1.5,"standard_error":0.1},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0},"point_estimate":1234.5e3,"standard_error":0.1}}"#;
        assert_eq!(
            json_number_after(est, "\"median\"", "\"point_estimate\":"),
            Some(1_234_500.0)
        );
        let mr = "+DT:AES-256-GCM:1:16\n+R:1:AES-256-GCM:1.0\n+H:16:64:1024\n+F:25:AES-256-GCM:45275373.91:178786089.80:1752059345.45\n";
        assert_eq!(
            parse_openssl_mr(mr).unwrap(),
            vec![
                (16.0, 45275373.91),
                (64.0, 178786089.80),
                (1024.0, 1752059345.45)
            ]
        );
    }
}
