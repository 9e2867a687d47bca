//! `cargo xtask bench`: every benchmark, each measured side by side with its baseline in one run.
mod handoff;
mod migration;
mod xdp;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Options {
    /// Run only these suites (default: all).
    #[arg(long, value_enum)]
    pub only: Vec<Suite>,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Suite {
    /// XDP program ns/packet per route kind vs. a minimal reference program (BPF_PROG_TEST_RUN). Needs root.
    Xdp,
    /// Snapshot serialization, compression, encryption and the full workflow (criterion).
    Migration,
    /// Freeze+export and import of a live QUIC connection with 0, 10 and 100 open streams (criterion).
    Handoff,
}

pub fn run(opts: &Options) -> Result<()> {
    let wanted = |s: Suite| opts.only.is_empty() || opts.only.contains(&s);
    if wanted(Suite::Xdp) {
        xdp::run()?;
    }
    if wanted(Suite::Migration) {
        migration::run()?;
    }
    if wanted(Suite::Handoff) {
        handoff::run()?;
    }
    Ok(())
}
