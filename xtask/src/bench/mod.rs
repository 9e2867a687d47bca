//! `cargo xtask bench`: every benchmark, each measured side by side with its baseline in one run.
mod cluster_drain;
mod drain;
mod e2e;
mod handoff;
mod http3;
mod migration;
mod stall;
mod stall_http3;
mod worker;
mod xdp;

use crate::util::require_root;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Options {
    /// Run only these suites (default: all).
    #[arg(long, value_enum)]
    pub only: Vec<Suite>,
    /// stall, http3-stall, drain, cluster-drain, worker, http3: use the binaries in this directory instead of building them (release) first.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    #[command(flatten)]
    pub stall: stall::StallOptions,
    #[command(flatten)]
    pub drain: drain::DrainOptions,
    #[command(flatten)]
    pub cluster_drain: cluster_drain::ClusterDrainOptions,
    #[command(flatten)]
    pub worker: worker::WorkerOptions,
    #[command(flatten)]
    pub http3: http3::Http3Options,
    /// cluster: flips per node count.
    #[arg(long, default_value_t = 1000)]
    pub cluster_flips: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Suite {
    /// XDP program ns/packet per route kind vs. a minimal reference program (BPF_PROG_TEST_RUN). Needs root.
    Xdp,
    /// The snapshot envelope: AES-256-GCM, encode, seal, open and the round trip (criterion).
    Migration,
    /// Freeze+export and import of a live QUIC connection with 0, 10 and 100 open streams (criterion).
    Handoff,
    /// Client-observed stall of live migrations (netns lab, baton-lb, two workers) on each path of
    /// --rtt x --loss (emulated by baton-load at the client; default RTT 0.1, 20, 50, 100, 200 ms
    /// with loss 0 and 1%) vs. the same request loop without migration on the same path; target:
    /// every migration ok, added stall p99 <= 5 ms (10 ms with loss). Needs root.
    Stall,
    /// The stall bench over HTTP/3 (issue 12): the lab's workers as HTTP/3 reverse proxies
    /// (`service = "proxy"`) with a baton-upstream beside each, h3-load (h3 over crates.io quinn)
    /// running one back-to-back GET loop with --gap-log, each path of --rtt x --loss emulated by
    /// baton-path (a UDP relay in the client namespace); migrations wait for the request in
    /// flight. Same options, windows and targets as `stall`. Needs root.
    Http3Stall,
    /// `baton drain` of 1,000 idle connections w1 -> w2 (netns lab): connections/s, then every
    /// connection verified on w2; target >= 1000/s. Needs root.
    Drain,
    /// baton-worker vs. a stock quinn 0.11 server (benches/stock-quinn), both serving the demo
    /// protocol on 127.0.0.1 pinned to core 1, the same baton-load on core 0, in --worker-rounds
    /// interleaved rounds: 32 connections of 64 B requests (requests/s, CPU per request), 4 long
    /// streams at 100 MB/s and at --worker-flood-rate (echoed MB/s, CPU per GB, RSS peak,
    /// byte-exact), --worker-idle idle connections (RSS per connection). Targets (issue 14):
    /// throughput >= 0.9x stock, CPU <= 1.1x stock, idle RSS <= stock.
    Worker,
    /// baton-worker's HTTP/3 reverse proxy (service "proxy") vs. h3-stock-proxy (crates.io quinn
    /// and h3, interop/h3-stock) in front of the same baton-upstream: both proxies pinned to core
    /// 1, the upstream and the same h3-load on core 0, in --http3-rounds interleaved rounds of
    /// --http3-connections x --http3-concurrency request loops, 1000 B GETs and the default mix
    /// (1000 B GET, 500 kB GET, 64 KiB POST): requests/s, latency p50/p99, proxy CPU per request,
    /// failed requests. Targets: requests/s >= 0.9x stock, no failed request on baton.
    Http3,
    /// A cluster flip's convergence (issue 13): from a migration's flip written to etcd until
    /// every LB node has applied and reported it, p50/p99 over --cluster-flips flips with 2 and 4
    /// nodes (the real follower on a real etcd, in-memory maps), beside one plain etcd write and
    /// read in the same run.
    Cluster,
    /// `baton drain` of --cluster-drain-connections idle connections in the cluster lab with 2 LB
    /// nodes beside 1 (issue 13): connections/s per size and the ratio, every connection
    /// verified afterwards. Needs root.
    ClusterDrain,
}

pub fn run(opts: &Options) -> Result<()> {
    let wanted = |s: Suite| opts.only.is_empty() || opts.only.contains(&s);
    if wanted(Suite::Xdp) {
        xdp::run()?;
    }
    if wanted(Suite::Migration) {
        migration::run()?;
    }
    if wanted(Suite::Handoff) {
        handoff::run()?;
    }
    if wanted(Suite::Stall)
        || wanted(Suite::Http3Stall)
        || wanted(Suite::Drain)
        || wanted(Suite::ClusterDrain)
    {
        require_root("the stall and drain benchmarks (netns lab, XDP)")?;
        let bins = match &opts.bin_dir {
            Some(d) => d.clone(),
            None => crate::demo::build_release()?,
        };
        if wanted(Suite::Stall) {
            stall::run(&bins, &opts.stall, &stall::Protocol::Demo)?;
        }
        if wanted(Suite::Http3Stall) {
            if opts.bin_dir.is_none() {
                crate::demo::build_release_packages(&["baton-test-upstream"])?;
            }
            // h3-load (interop/h3-stock, its own workspace); the rest is in `bins`.
            let h3 = http3::build(Some(&bins))?;
            stall::run(
                &bins,
                &opts.stall,
                &stall::Protocol::Http3 { h3_load: h3.load },
            )?;
        }
        if wanted(Suite::Drain) {
            drain::run(&bins, &opts.drain)?;
        }
        if wanted(Suite::ClusterDrain) {
            cluster_drain::run(&bins, &opts.cluster_drain)?;
        }
    }
    if wanted(Suite::Worker) {
        let bins = match &opts.bin_dir {
            Some(d) => d.clone(),
            None => {
                eprintln!("[bench worker] building baton-worker and baton-load (release)");
                crate::demo::build_release_packages(&["baton-worker", "baton-load"])?
            }
        };
        worker::run(&bins, &opts.worker)?;
    }
    if wanted(Suite::Http3) {
        let bins = http3::build(opts.bin_dir.as_deref())?;
        http3::run(&bins, &opts.http3)?;
    }
    if wanted(Suite::Cluster) {
        crate::util::run(crate::util::cargo().args([
            "run",
            "-q",
            "--release",
            "-p",
            "baton-cluster",
            "--example",
            "flip_latency",
            "--",
            "--flips",
            &opts.cluster_flips.to_string(),
            "--nodes",
            "2,4",
        ]))?;
    }
    Ok(())
}
