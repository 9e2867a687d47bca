//! `cargo xtask bench`: every benchmark, each measured side by side with its baseline in one run.
mod drain;
mod e2e;
mod handoff;
mod migration;
mod stall;
mod xdp;

use crate::util::require_root;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Options {
    /// Run only these suites (default: all).
    #[arg(long, value_enum)]
    pub only: Vec<Suite>,
    /// stall, drain: use the binaries in this directory instead of building them (release) first.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    #[command(flatten)]
    pub stall: stall::StallOptions,
    #[command(flatten)]
    pub drain: drain::DrainOptions,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Suite {
    /// XDP program ns/packet per route kind vs. a minimal reference program (BPF_PROG_TEST_RUN). Needs root.
    Xdp,
    /// Snapshot serialization, compression, encryption and the full workflow (criterion).
    Migration,
    /// Freeze+export and import of a live QUIC connection with 0, 10 and 100 open streams (criterion).
    Handoff,
    /// Client-observed stall of live migrations (netns lab, baton-lb, two workers) on each path of
    /// --rtt x --loss (emulated by baton-load at the client; default RTT 0.1, 20, 50, 100, 200 ms
    /// with loss 0 and 1%) vs. the same request loop without migration on the same path; target:
    /// every migration ok, added stall p99 <= 5 ms (10 ms with loss). Needs root.
    Stall,
    /// `baton drain` of 1,000 idle connections w1 -> w2 (netns lab): connections/s, then every
    /// connection verified on w2; target >= 1000/s. Needs root.
    Drain,
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
    if wanted(Suite::Stall) || wanted(Suite::Drain) {
        require_root("the stall and drain benchmarks (netns lab, XDP)")?;
        let bins = match &opts.bin_dir {
            Some(d) => d.clone(),
            None => crate::demo::build_release()?,
        };
        if wanted(Suite::Stall) {
            stall::run(&bins, &opts.stall)?;
        }
        if wanted(Suite::Drain) {
            drain::run(&bins, &opts.drain)?;
        }
    }
    Ok(())
}
