//! BTF map definitions that carry `pinning = LIBBPF_PIN_BY_NAME`.
//!
//! aya-ebpf 0.2's legacy `#[map]` definitions can be pinned but carry no BTF for keys and values
//! (so `bpftool map dump` prints raw hex), and its `#[btf_map]` types have BTF but no pinning
//! field. The loader (aya-obj) reads both `key`/`value` types and `pinning` from a `.maps` struct,
//! so this one definition gives the controller pin-by-name re-adoption *and* readable dumps.
//! Every field is a pointer whose pointee's type encodes the value, as libbpf's `__uint`/`__type`.

use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_map_lookup_elem, bpf_redirect_map};

/// `LIBBPF_PIN_BY_NAME`: pinned as `<map_pin_path>/<map name>`, re-used when already there.
const PIN_BY_NAME: usize = 1;

#[repr(C)]
pub struct PinnedMap<K, V, const TYPE: usize, const MAX_ENTRIES: usize, const FLAGS: usize = 0> {
    r#type: *const [i32; TYPE],
    key: *const K,
    value: *const V,
    max_entries: *const [i32; MAX_ENTRIES],
    map_flags: *const [i32; FLAGS],
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: the fields are null placeholders the loader reads from BTF; nothing dereferences them.
unsafe impl<K, V, const T: usize, const M: usize, const F: usize> Sync
    for PinnedMap<K, V, T, M, F>
{
}

impl<K, V, const T: usize, const M: usize, const F: usize> PinnedMap<K, V, T, M, F> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    #[inline(always)]
    fn as_ptr(&self) -> *mut c_void {
        self as *const Self as *mut c_void
    }

    /// Pointer to the value stored under `key`, if any.
    #[inline(always)]
    pub fn lookup(&self, key: &K) -> Option<*mut V> {
        // SAFETY: the map pointer is this map's definition, which the loader relocates to the fd;
        // the key points to a live `K` on the stack.
        let p = unsafe { bpf_map_lookup_elem(self.as_ptr(), key as *const K as *const c_void) };
        if p.is_null() { None } else { Some(p as *mut V) }
    }

    /// `bpf_redirect_map` (DEVMAP only): `Ok(XDP_REDIRECT)`, or `Err(flags & 3)` on a missing entry.
    #[inline(always)]
    pub fn redirect(&self, index: u32, flags: u64) -> Result<u32, u32> {
        // SAFETY: as for `lookup`; the helper only reads the map.
        let ret = unsafe { bpf_redirect_map(self.as_ptr(), index as u64, flags) } as u32;
        if ret == aya_ebpf::bindings::xdp_action::XDP_REDIRECT {
            Ok(ret)
        } else {
            Err(ret)
        }
    }
}

pub const HASH: usize = aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_HASH as usize;
pub const ARRAY: usize = aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_ARRAY as usize;
pub const PERCPU_ARRAY: usize =
    aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY as usize;
pub const DEVMAP: usize = aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_DEVMAP as usize;
