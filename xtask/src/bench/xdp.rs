//! XDP per-packet cost (owned by the data-plane work).
pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("the XDP benchmark is not built yet")
}
