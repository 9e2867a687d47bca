//! The load balancer's host side: loads and attaches the XDP program, owns the pinned maps,
//! computes Maglev tables, health-checks workers and serves the control socket and `/metrics`.
//! The `baton-lb` daemon is a thin layer over it; the operator CLI (`baton`, crate `baton-cli`)
//! reads and writes the same pinned maps through it.

/// The compiled XDP object, embedded at build time (see `build.rs`).
pub mod object;
/// `baton route`: the loaded program's own answer, on the live maps with private counters.
pub mod simulate;
/// BPF_PROG_TEST_RUN helpers for `baton route`, the packet fixtures and the XDP benchmark.
pub mod testrun;

pub mod cluster;
pub mod config;
pub mod control;
pub mod controller;
pub mod dataplane;
pub mod fastpath;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod neigh;
pub mod overrides;
pub mod pinned;
pub mod sys;

/// Pin directory used when `--pin-dir` is not given.
pub const DEFAULT_PIN_DIR: &str = lb_common::PIN_DIR;
