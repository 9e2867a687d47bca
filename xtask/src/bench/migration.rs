//! Migration pipeline benchmarks (owned by the migration-pipeline work).
pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("the migration benchmark is not built yet")
}
