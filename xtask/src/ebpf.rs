//! `cargo xtask build-ebpf` (owned by the data-plane work).
#[derive(clap::Args)]
pub struct Options {}
pub fn build(_opts: &Options) -> anyhow::Result<()> {
    anyhow::bail!("build-ebpf is not built yet")
}
