//! XDP per-packet cost: `cargo bench -p baton-benches --bench xdp` (BPF_PROG_TEST_RUN, needs root).
//! Prints ns/packet per route kind next to `baton_xdp_reference` from the same run.
use crate::util::{self, cargo, require_root};

pub fn run() -> anyhow::Result<()> {
    require_root("the XDP benchmark")?;
    util::run(cargo().args(["bench", "-p", "baton-benches", "--bench", "xdp"]))
}
