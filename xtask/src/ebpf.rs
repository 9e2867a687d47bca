//! `cargo xtask build-ebpf`: builds the XDP object (lb-ebpf) the way lb-user's build.rs does
//! (nightly, `-Z build-std=core`, bpf-linker, BTF), then says where it is and how big.
use crate::util::{self, workspace_root};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;

#[derive(clap::Args)]
pub struct Options {
    /// Build with the dev profile instead of release (the verifier usually rejects it).
    #[arg(long)]
    pub debug: bool,
}

pub fn build(opts: &Options) -> Result<()> {
    check_tools()?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("ebpf");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "lb-ebpf",
        "--bins",
    ])
    .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    // Same flags as aya-build: BTF (for the verifier's messages and bpftool's map dumps).
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
    )
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER");
    if !opts.debug {
        cmd.arg("--release");
    }
    util::run(&mut cmd)?;
    let profile = if opts.debug { "debug" } else { "release" };
    let object = target_dir
        .join("bpfel-unknown-none")
        .join(profile)
        .join("lb-ebpf");
    let size = std::fs::metadata(&object)
        .with_context(|| format!("the build succeeded but {} is missing", object.display()))?
        .len();
    println!("XDP object: {} ({size} bytes)", object.display());
    println!(
        "programs: baton_xdp (router), baton_xdp_reference (benchmark baseline), baton_xdp_pass (veth peers)"
    );
    println!(
        "inspect its BTF (map key/value types): bpftool btf dump file {}",
        object.display()
    );
    Ok(())
}

fn check_tools() -> Result<()> {
    let ok = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !ok("rustup", &["run", "nightly", "rustc", "--version"]) {
        bail!(
            "the nightly toolchain is missing: `rustup toolchain install nightly --component rust-src`"
        );
    }
    if !ok("bpf-linker", &["--version"]) {
        bail!(
            "bpf-linker is not on PATH: `cargo xtask setup` builds it against the nightly's LLVM \
             (docs/ENVIRONMENT.md, section bpf-linker)"
        );
    }
    Ok(())
}
