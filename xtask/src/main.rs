//! `cargo xtask <command>`: the one place the README's commands go through.
mod bench;
mod demo;
mod ebpf;
mod fuzz;
mod lab;
mod patch;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Baton developer tasks: build the XDP program, run the netns lab, tests and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the XDP object (lb-ebpf) for the BPF target with the nightly toolchain and bpf-linker.
    BuildEbpf(ebpf::Options),
    /// Create or remove the network-namespace lab (client, LB, two workers). Needs root.
    Lab {
        #[command(subcommand)]
        action: lab::Action,
    },
    /// Run every test: unit, property, BPF_PROG_TEST_RUN fixtures and netns integration tests. Needs root.
    Test(test::Options),
    /// Unpack the pinned dependency sources we patch into .patched/ and apply patches/<crate>/*.patch.
    PatchDeps,
    /// The mission end to end (root): lab, baton-lb, two workers, a client load, every connection
    /// migrated w1 -> w2 -> w1 several times while it runs; prints a report and a RESULT line.
    Demo(demo::Options),
    /// Run the benchmarks (XDP per-packet cost, migration pipeline) and print a side-by-side report.
    Bench(bench::Options),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Every workspace build resolves [patch.crates-io], which points at the patched quinn-proto
    // source: make sure it exists (and is current) before any command invokes cargo on the workspace.
    if !matches!(cli.command, Command::PatchDeps) {
        patch::prepare()?;
    }
    match cli.command {
        Command::BuildEbpf(opts) => ebpf::build(&opts),
        Command::Lab { action } => lab::run(action),
        Command::Test(opts) => test::run(&opts),
        Command::Bench(opts) => bench::run(&opts),
        Command::Demo(opts) => demo::run(&opts),
        Command::PatchDeps => patch::prepare(),
    }
}
