//! Small helpers shared by the xtask commands.
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "{what} needs root (XDP, bpffs and network namespaces are privileged): run it with sudo, e.g. `sudo -E cargo xtask ...`"
        );
    }
    Ok(())
}

/// Runs a command in the workspace root, echoing it, and fails with its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    cmd.current_dir(workspace_root());
    eprintln!("[xtask] $ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `cargo build --release` of interop/h3-stock (its own workspace: crates.io quinn, h3 and
/// h3-quinn without our patches; `h3-load`, `h3-stock-proxy`) into `target`; returns the
/// directory of its binaries.
pub fn build_h3_stock(target: &std::path::Path) -> Result<PathBuf> {
    run(cargo()
        .args(["build", "--release", "--manifest-path"])
        .arg(workspace_root().join("interop/h3-stock/Cargo.toml"))
        .arg("--target-dir")
        .arg(target))?;
    Ok(target.join("release"))
}
