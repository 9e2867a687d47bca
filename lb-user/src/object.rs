//! The compiled XDP object (`lb-ebpf`), embedded at build time by `build.rs`.
//!
//! It holds four programs: `baton_xdp` (the router), `baton_xdp_reference` (benchmark baseline:
//! parse to the DCID, drop), `baton_xdp_forward_floor` (benchmark floor: the reference plus the
//! forwarding every routed packet needs) and `baton_xdp_pass` (for veth peers, so native
//! redirects deliver),
//! and the maps named in `lb_common::map_names`, all pinned by name.
//!
//! Loading with the maps pinned in (or re-adopted from) a directory, which must exist:
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let mut ebpf = aya::EbpfLoader::new().default_map_pin_directory(lb_common::PIN_DIR).load(lb_user::object::bytes())?;
//! let prog: &mut aya::programs::Xdp = ebpf.program_mut(lb_user::object::PROGRAM).unwrap().try_into()?;
//! prog.load()?;
//! # Ok(()) }
//! ```
//!
//! aya 0.14 re-uses a pinned map of the same name as it is, without comparing its key/value
//! sizes with the object's, so a layout change in `lb_common` needs the old pins removed.

/// Name of the routing program in the object.
pub const PROGRAM: &str = "baton_xdp";
/// Name of the benchmark baseline program.
pub const REFERENCE_PROGRAM: &str = "baton_xdp_reference";
/// Name of the benchmark floor: the reference's walk plus the forwarding every routed packet
/// needs (MAC rewrite, counters, devmap redirect), no routing decision.
pub const FORWARD_FLOOR_PROGRAM: &str = "baton_xdp_forward_floor";
/// Name of the pass-everything program the lab attaches to veth peers.
pub const PASS_PROGRAM: &str = "baton_xdp_pass";

// 8-byte aligned: the ELF parser reads structs in place.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The ELF bytes of the XDP object, for `aya::EbpfLoader::load`.
///
/// Panics with what to do if the crate was built with `AYA_BUILD_SKIP=1` (no object embedded).
pub fn bytes() -> &'static [u8] {
    assert!(
        !OBJECT.is_empty(),
        "lb-user was built with AYA_BUILD_SKIP=1, so no XDP object is embedded: rebuild without it \
         (needs the nightly toolchain with rust-src and bpf-linker)"
    );
    OBJECT
}

/// The embedded object, or `None` when built with `AYA_BUILD_SKIP=1`.
pub fn try_bytes() -> Option<&'static [u8]> {
    (!OBJECT.is_empty()).then_some(OBJECT)
}
