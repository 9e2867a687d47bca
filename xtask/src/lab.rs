//! `cargo xtask lab up|down`: the network-namespace lab for Baton, the fixed instance of the
//! topology in the `baton-lab` crate (`lab/src/lib.rs`, which draws it): namespaces
//! `baton-client`, `baton-lb`, `baton-w1`, `baton-w2`, addresses under 10.200/16 and
//! fd00:200::/32, interfaces `bt-*`.
use crate::util::{require_root, workspace_root};
use anyhow::Result;
use baton_lab::Topology;

#[derive(clap::Subcommand)]
pub enum Action {
    /// Create the namespaces, links, addresses and routes (idempotent: re-running repairs).
    Up,
    /// Remove the namespaces the lab made (and with them its interfaces).
    Down,
}

pub const CLIENT_NS: &str = baton_lab::FIXED_CLIENT_NS;
pub const LB_NS: &str = baton_lab::FIXED_LB_NS;
pub const VIP4: &str = baton_lab::FIXED.vip4;
pub const VIP6: &str = baton_lab::FIXED.vip6;

pub fn run(action: Action) -> Result<()> {
    require_root("cargo xtask lab")?;
    match action {
        Action::Up => up(),
        Action::Down => down(),
    }
}

fn up() -> Result<()> {
    up_quiet()?;
    print_summary();
    Ok(())
}

/// `lab up` without the summary (for `cargo xtask demo`).
pub fn up_quiet() -> Result<()> {
    Topology::fixed().up()
}

fn down() -> Result<()> {
    down_quiet()?;
    if std::path::Path::new("/sys/fs/bpf/baton").exists() {
        println!(
            "note: /sys/fs/bpf/baton still holds baton-lb's pins (the lab did not make them): \
             `baton-lb detach` removes them"
        );
    }
    Ok(())
}

/// Removes the lab's namespaces, saying which.
pub fn down_quiet() -> Result<()> {
    let removed = Topology::fixed().down()?;
    for ns in &removed {
        println!("removed namespace {ns}");
    }
    if removed.is_empty() {
        println!("no lab namespaces were present");
    }
    Ok(())
}

fn print_summary() {
    println!("Baton lab is up:");
    for p in &Topology::fixed().pairs() {
        for e in [&p.a, &p.b] {
            println!(
                "  {:<13} {:<9} {:<15} {:<18} {}",
                e.ns, e.dev, e.v4, e.v6, e.mac
            );
        }
    }
    println!(
        "  VIP {VIP4} and {VIP6} (UDP 4433) on lo in {} and {}",
        baton_lab::FIXED_WORKER_NS[0],
        baton_lab::FIXED_WORKER_NS[1]
    );
    let cfg = workspace_root().join("lab/lb.toml");
    println!();
    println!("Next:");
    println!("  cargo build --release -p lb-user");
    println!(
        "  sudo target/release/baton-lb --netns {LB_NS} --config {}",
        cfg.display()
    );
    println!("  sudo target/release/baton status");
    println!("  sudo bpftool map dump pinned /sys/fs/bpf/baton/BATON_WORKERS");
    println!("  (`ip netns exec` would hide the host's bpffs from baton-lb: use --netns)");
}
