//! The operator side of Baton: the `baton` CLI's library. [`driver`] carries out the migrations
//! `baton_orchestrator::Migration` models, over the workers' control API (Unix socket or mutual
//! TLS) and the LB's override map.
pub mod cluster;
pub mod driver;
