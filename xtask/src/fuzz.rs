//! Bounded fuzzing of the migration snapshot decoder (fuzz/, a cargo-fuzz crate outside the
//! workspace). Needs the nightly toolchain; installs cargo-fuzz if it is missing.
use crate::util::workspace_root;
use anyhow::{Context, Result, bail};
use std::process::Command;

const TARGET: &str = "decode_snapshot";

/// Runs the decoder fuzz target for `seconds` seconds. New inputs go to fuzz/corpus/ (ignored by
/// git); the checked-in seeds in fuzz/seeds/ are read only. A crash fails with the input's path.
pub fn run_bounded(seconds: u64) -> Result<()> {
    let ok = |args: &[&str]| {
        Command::new("rustup")
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !ok(&["run", "nightly", "rustc", "--version"]) {
        bail!("fuzzing needs the nightly toolchain: `rustup toolchain install nightly`");
    }
    if !ok(&["run", "nightly", "cargo", "fuzz", "--version"]) {
        eprintln!("[xtask] cargo-fuzz is missing: installing it");
        crate::util::run(Command::new("rustup").args([
            "run",
            "stable",
            "cargo",
            "install",
            "cargo-fuzz",
            "--locked",
        ]))?;
    }
    let fuzz_dir = workspace_root().join("fuzz");
    let corpus = format!("corpus/{TARGET}");
    std::fs::create_dir_all(fuzz_dir.join(&corpus))
        .with_context(|| format!("creating fuzz/{corpus}"))?;
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "fuzz",
        "run",
        TARGET,
        &corpus,
        &format!("seeds/{TARGET}"),
        "--",
    ])
    .arg(format!("-max_total_time={seconds}"))
    // The decoder caps state at 1 MiB in the target; anything near this limit is a leak.
    .arg("-rss_limit_mb=2048")
    .current_dir(&fuzz_dir);
    eprintln!("[xtask] $ (cd fuzz && {cmd:?})");
    let status = cmd.status().context("could not start cargo fuzz")?;
    if !status.success() {
        bail!(
            "fuzzing {TARGET} failed ({status}): the crashing input is under fuzz/artifacts/{TARGET}/; reproduce with `cd fuzz && cargo +nightly fuzz run {TARGET} <file>`"
        );
    }
    eprintln!("[xtask] fuzzed {TARGET} for {seconds} s without a crash");
    Ok(())
}
