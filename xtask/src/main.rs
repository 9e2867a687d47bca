//! `cargo xtask <command>`: the one place the README's commands go through.
mod bench;
mod demo;
mod ebpf;
mod fuzz;
mod lab;
mod netpath;
mod patch;
mod setup;
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
    /// Run the benchmarks (XDP per-packet cost, migration snapshot envelope) and print a side-by-side report.
    Bench(bench::Options),
    /// Install what this machine lacks (apt tools, nightly rust-src, bpf-linker, bpffs); demo, test,
    /// build-ebpf, lab and bench do this first.
    #[command(long_about = setup::ABOUT)]
    Setup,
}

fn main() -> anyhow::Result<()> {
    // Before anything else (and before any thread): bpf-linker lives in $CARGO_HOME/bin, which need
    // not be on the PATH cargo was started with, and the builds we start run it by name.
    setup::put_cargo_bin_on_path();
    let cli = Cli::parse();
    // Every command but patch-deps starts with setup::ensure (test and demo call it in their run,
    // after their root check): it installs what the machine lacks, then prepares the patched
    // quinn-proto source that every workspace build resolves through [patch.crates-io] (which needs
    // curl, tar and patch from the first part, so it cannot come before it).
    match cli.command {
        Command::BuildEbpf(opts) => {
            setup::ensure("cargo xtask build-ebpf")?;
            ebpf::build(&opts)
        }
        Command::Lab { action } => {
            setup::ensure("cargo xtask lab")?;
            lab::run(action)
        }
        Command::Test(opts) => test::run(&opts),
        Command::Bench(opts) => {
            setup::ensure("cargo xtask bench")?;
            bench::run(&opts)
        }
        Command::Demo(opts) => demo::run(&opts),
        Command::Setup => setup::ensure("cargo xtask setup"),
        Command::PatchDeps => patch::prepare(),
    }
}
