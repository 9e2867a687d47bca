//! XDP per-packet cost: `cargo bench -p baton-benches --bench xdp` (BPF_PROG_TEST_RUN, needs root).
//! Prints ns/packet per route kind next to `baton_xdp_reference` (and `baton_xdp_forward_floor`)
//! from the same run. `BATON_XDP_BENCH_BASELINE=<another build's lb-ebpf object>` adds that
//! build's figures from the same rounds (before/after).
use crate::util::{self, cargo, require_root};

pub fn run() -> anyhow::Result<()> {
    require_root("the XDP benchmark")?;
    util::run(cargo().args(["bench", "-p", "baton-benches", "--bench", "xdp"]))
}
