//! `cargo xtask test`: everything the README promises, in one command.
use crate::util::{self, cargo, require_root};
use anyhow::Result;

#[derive(clap::Args)]
pub struct Options {
    /// Seconds to fuzz the snapshot decoder after the tests (0 skips fuzzing; CI uses the default).
    #[arg(long, default_value_t = 30)]
    pub fuzz_seconds: u64,

    /// Extra arguments passed to every `cargo test` (e.g. a test name filter after `--`).
    #[arg(trailing_var_arg = true)]
    pub args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    require_root("cargo xtask test")?;
    crate::setup::ensure("cargo xtask test")?;
    // Unit and property tests of every crate but the netns/BPF integration suite.
    util::run(
        cargo()
            .args([
                "test",
                "--workspace",
                "--exclude",
                "baton-tests",
                "--exclude",
                "lb-ebpf",
            ])
            .args(&opts.args),
    )?;
    // Integration tests share network namespaces and the bpffs pin directory: one at a time. They
    // run release builds of the real binaries, as deployed: migrations under load are
    // timing-sensitive (a target must confirm an import within the transfer timeout), and debug
    // builds of the crypto and QUIC stacks on a 2-core machine are not what users run.
    util::run(
        cargo()
            .args([
                "test",
                "--release",
                "-p",
                "baton-tests",
                "--",
                "--test-threads=1",
            ])
            .args(&opts.args),
    )?;
    // A short, bounded fuzz run of the snapshot decoder: untrusted bytes from another worker.
    if opts.fuzz_seconds > 0 {
        crate::fuzz::run_bounded(opts.fuzz_seconds)?;
    }
    eprintln!("[xtask] all tests passed");
    Ok(())
}
