//! Connection handoff cost: `cargo bench -p baton-handoff --bench handoff` (criterion).
//! Measures freeze+export and import of a live connection with 0, 10 and 100 open streams.
use crate::util::{self, cargo};

pub fn run() -> anyhow::Result<()> {
    util::run(cargo().args(["bench", "-p", "baton-handoff", "--bench", "handoff"]))
}
