//! `cargo xtask lab up|down` (owned by the control-plane work).
#[derive(clap::Subcommand)]
pub enum Action { Up, Down }
pub fn run(_action: Action) -> anyhow::Result<()> {
    anyhow::bail!("the lab is not built yet")
}
