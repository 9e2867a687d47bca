//! Baton's controller library: loads the XDP program, owns the pinned maps, computes Maglev tables.
//! The binaries `baton-lb` (daemon) and `baton` (operator CLI) are thin layers over it.

/// The compiled XDP object, embedded at build time (see `build.rs`).
pub mod object;
