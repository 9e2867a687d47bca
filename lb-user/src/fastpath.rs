//! Fills the XDP program's derived fast-path maps (`lb_common::fastpath`) from the authoritative
//! ones (`BATON_VIPS`, `BATON_SERVER_IDS`, `BATON_CID_OVERRIDE`, `BATON_CONFIG`).
//!
//! The authoritative maps stay the controller's API (`baton route` runs the program on them and
//! the live mirrors); the derived maps only let the program skip hash lookups. Each derived map
//! is used by the program only while its flag is set in `BATON_FASTPATH`, and only for the CID
//! layout recorded there, so:
//!
//! * before [`FastPath::rebuild`] has run (fresh maps), the program uses the hash maps only;
//! * a new `LbConfig` layout without a rebuild makes the program ignore the tables (slower,
//!   still correct) until [`FastPath::rebuild`] runs.
//!
//! # What the controller must do (ordering rules)
//!
//! 1. After start-up has written `BATON_CONFIG`, `BATON_VIPS`, `BATON_SERVER_IDS` (and after
//!    any layout change): [`FastPath::rebuild`] from those maps. Under an unchanged layout it
//!    only raises override counts to what it tallies, so `baton override set|del` may run
//!    meanwhile (a daemon restarted during migrations); after a layout change it recounts from
//!    zero, and no other process may write overrides while it runs.
//! 2. VIPs: after inserting into / removing from `BATON_VIPS`, call [`FastPath::sync_vips`]
//!    (or [`FastPath::sync_vip_table`] with the enabled keys). One writer (the daemon).
//! 3. Server IDs: write `BATON_SERVER_IDS` first, then [`FastPath::set_server_id`]; on removal,
//!    delete from `BATON_SERVER_IDS` first, then [`FastPath::remove_server_id`].
//! 4. Overrides: every writer (daemon *and* `baton override set|del`) goes through
//!    [`FastPath::insert_override`] / [`FastPath::remove_override`] instead of writing
//!    `BATON_CID_OVERRIDE` directly. They increment the override's bucket count *before* the
//!    insert and decrement it only *after* a successful delete, so the count is never lower than
//!    the number of entries; the program skips the override lookup only on a zero count. A
//!    writer that inserts behind their back (bpftool, an old binary) must be followed by a
//!    [`FastPath::rebuild`] or [`FastPath::disable`], or that override is ignored.
//!
//! Counts live in mmapable arrays and are changed with atomic read-modify-write operations on
//! a shared mapping, so the daemon and the CLI can count concurrently without lost updates.
use std::borrow::{Borrow, BorrowMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use aya::Ebpf;
use aya::maps::{Array, HashMap, Map, MapData, MapError};
use lb_common::fastpath::{
    FP_OVERRIDE_COUNTS, FP_SERVER_ID_TABLE, FP_VIP_TABLE, FastPathState, OverrideBucket,
    SERVER_ID_TABLE_MAX_LEN, SERVER_ID_TABLE_SIZE, ServerIdSlot, VIP_SLOT_ENABLED, VIP_TABLE_SLOTS,
    VipSlot, VipTable, maglev_reciprocal, override_bucket,
};
use lb_common::{
    AF_INET, CidKey, CidLayout, LbConfig, NO_WORKER, ServerIdKey, VipKey, VipValue, WorkerRef,
    map_names,
};

/// The derived maps this module writes.
pub const MAPS: [&str; 3] = [
    map_names::FASTPATH,
    map_names::VIP_TABLE,
    map_names::SERVER_ID_TABLE,
];

const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// A shared read-write mapping of a `BPF_F_MMAPABLE` array map.
struct Mmap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, only accessed through atomics.
unsafe impl Send for Mmap {}
unsafe impl Sync for Mmap {}

impl Mmap {
    fn new(fd: BorrowedFd<'_>, bytes: usize, name: &str) -> Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = bytes.div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's value area; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let err = std::io::Error::last_os_error();
            bail!(
                "cannot mmap {name}: {err} (was it created without BPF_F_MMAPABLE by an older Baton?)"
            );
        }
        Ok(Self {
            ptr: ptr as *mut u8,
            len,
        })
    }

    /// The u32 at byte `offset` (4-aligned, inside the mapping).
    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(offset + 4 <= self.len && offset.is_multiple_of(4));
        // SAFETY: in bounds and aligned (the mapping is page-aligned); the memory lives as long
        // as `self` and is only ever accessed atomically from userspace.
        unsafe { &*(self.ptr.add(offset) as *const AtomicU32) }
    }

    /// The u64 at byte `offset` (8-aligned, inside the mapping).
    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(offset + 8 <= self.len && offset.is_multiple_of(8));
        // SAFETY: as `u32_at`.
        unsafe { &*(self.ptr.add(offset) as *const AtomicU64) }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: exactly the region mapped in `new`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Array-map elements are `round_up(value_size, 8)` bytes apart, also in the mapping.
const SLOT_STRIDE: usize = size_of::<ServerIdSlot>().next_multiple_of(8);
const STATE_FLAGS: usize = std::mem::offset_of!(FastPathState, flags);
const STATE_OTHER: usize = std::mem::offset_of!(FastPathState, other_overrides);
/// `cid_len` and `server_id_len` (and two pad bytes) as one u32.
const STATE_LAYOUT: usize = std::mem::offset_of!(FastPathState, cid_len);
const STATE_RECIPROCAL: usize = std::mem::offset_of!(FastPathState, maglev_reciprocal);

/// Handles on the derived maps. Cheap to keep for the daemon's lifetime, or to open per CLI call.
pub struct FastPath {
    state: Mmap,
    sids: Mmap,
    vip_table: Array<MapData, VipTable>,
}

fn array_fd(map: &Map) -> Result<BorrowedFd<'_>> {
    match map {
        Map::Array(data) => Ok(data.fd().as_fd()),
        _ => bail!("not an array map"),
    }
}

impl FastPath {
    /// Opens the derived maps pinned under `pin_dir` (what the daemon and the CLI use).
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<MapData> {
            let path = pin_dir.join(name);
            MapData::from_pin(&path)
                .with_context(|| format!("cannot open the pinned map {}", path.display()))
        };
        let state = open(map_names::FASTPATH)?;
        let sids = open(map_names::SERVER_ID_TABLE)?;
        let vips = open(map_names::VIP_TABLE)?;
        Self::from_parts(
            state.fd().as_fd(),
            sids.fd().as_fd(),
            Map::from_map_data(vips)?,
        )
    }

    /// The derived maps of a loaded object (its maps need not be pinned).
    pub fn from_ebpf(ebpf: &Ebpf) -> Result<Self> {
        let get = |name: &str| {
            ebpf.map(name)
                .ok_or_else(|| anyhow!("the XDP object has no map {name}"))
        };
        let vips = match get(map_names::VIP_TABLE)? {
            Map::Array(data) => MapData::from_fd(data.fd().as_fd().try_clone_to_owned()?)?,
            _ => bail!("{} is not an array map", map_names::VIP_TABLE),
        };
        Self::from_parts(
            array_fd(get(map_names::FASTPATH)?)?,
            array_fd(get(map_names::SERVER_ID_TABLE)?)?,
            Map::from_map_data(vips)?,
        )
    }

    fn from_parts(state: BorrowedFd<'_>, sids: BorrowedFd<'_>, vips: Map) -> Result<Self> {
        Ok(Self {
            state: Mmap::new(state, size_of::<FastPathState>(), map_names::FASTPATH)?,
            sids: Mmap::new(
                sids,
                SLOT_STRIDE * SERVER_ID_TABLE_SIZE as usize,
                map_names::SERVER_ID_TABLE,
            )?,
            vip_table: Array::try_from(vips).with_context(|| {
                format!("{} does not have this build's layout", map_names::VIP_TABLE)
            })?,
        })
    }

    /// A snapshot of `BATON_FASTPATH`.
    pub fn state(&self) -> FastPathState {
        let layout = self.state.u32_at(STATE_LAYOUT).load(Ordering::SeqCst);
        FastPathState {
            flags: self.state.u32_at(STATE_FLAGS).load(Ordering::SeqCst),
            other_overrides: self.state.u32_at(STATE_OTHER).load(Ordering::SeqCst),
            cid_len: layout as u8,
            server_id_len: (layout >> 8) as u8,
            _pad: [0; 2],
            _pad2: 0,
            maglev_reciprocal: self.state.u64_at(STATE_RECIPROCAL).load(Ordering::SeqCst),
        }
    }

    /// The server-ID table slot for `server_id` (tests, debugging).
    pub fn server_id_slot(&self, server_id: u32) -> Option<ServerIdSlot> {
        (server_id < SERVER_ID_TABLE_SIZE).then(|| ServerIdSlot {
            worker: self.slot_worker(server_id).load(Ordering::SeqCst),
            overrides: self.slot_overrides(server_id).load(Ordering::SeqCst),
        })
    }

    /// The current `BATON_VIP_TABLE` (tests, debugging).
    pub fn vip_table(&self) -> Result<VipTable> {
        Ok(self.vip_table.get(&0, 0)?)
    }

    fn slot_worker(&self, sid: u32) -> &AtomicU32 {
        self.sids
            .u32_at(sid as usize * SLOT_STRIDE + std::mem::offset_of!(ServerIdSlot, worker))
    }

    fn slot_overrides(&self, sid: u32) -> &AtomicU32 {
        self.sids
            .u32_at(sid as usize * SLOT_STRIDE + std::mem::offset_of!(ServerIdSlot, overrides))
    }

    /// Clears every flag: from now on the program uses only the authoritative maps.
    pub fn disable(&self) {
        self.state.u32_at(STATE_FLAGS).store(0, Ordering::SeqCst);
    }

    /// Rebuilds every derived map from the authoritative ones and enables them. For start-up
    /// (fresh or re-adopted maps) and after a change of `LbConfig`'s CID layout. The program
    /// keeps using the hash maps until the end. See the module's rule 1 for concurrent writers.
    pub fn rebuild<TV, TS, TO>(
        &mut self,
        cfg: &LbConfig,
        vips: &HashMap<TV, VipKey, VipValue>,
        server_ids: &HashMap<TS, ServerIdKey, WorkerRef>,
        overrides: &HashMap<TO, CidKey, WorkerRef>,
    ) -> Result<()>
    where
        TV: Borrow<MapData>,
        TS: Borrow<MapData>,
        TO: Borrow<MapData>,
    {
        self.disable();
        // Let program runs that read the old flags finish (a run takes well under a microsecond)
        // before their tables and counts are rewritten.
        std::thread::sleep(std::time::Duration::from_millis(2));
        self.set_maglev_size(cfg.maglev_size);
        let layout = cfg.cid_len as u32 | (cfg.server_id_len as u32) << 8;
        let same_layout = self
            .state
            .u32_at(STATE_LAYOUT)
            .swap(layout, Ordering::SeqCst)
            == layout;
        for sid in 0..SERVER_ID_TABLE_SIZE {
            self.slot_worker(sid).store(NO_WORKER, Ordering::Relaxed);
        }
        if !same_layout {
            // The buckets mean something else now: start the counts afresh.
            self.state.u32_at(STATE_OTHER).store(0, Ordering::SeqCst);
            for sid in 0..SERVER_ID_TABLE_SIZE {
                self.slot_overrides(sid).store(0, Ordering::Relaxed);
            }
        }
        let table_ok = CidLayout::new(cfg.cid_len, cfg.server_id_len).is_ok()
            && cfg.server_id_len <= SERVER_ID_TABLE_MAX_LEN;
        for kv in server_ids.iter() {
            let (k, w) = kv.context("reading BATON_SERVER_IDS")?;
            self.set_server_id(k.server_id, w.worker);
        }
        // Counts only ever rise to the tally here, never drop to it: a `baton override set`
        // running meanwhile has counted its entry before inserting it, and the tally may have
        // missed the insert. Zeroing and recounting could leave an override uncounted (ignored).
        let st = self.state();
        let mut tally: std::collections::HashMap<OverrideBucket, u32> = Default::default();
        for key in overrides.keys() {
            let key = key.context("reading BATON_CID_OVERRIDE")?;
            *tally
                .entry(override_bucket(st.cid_len, st.server_id_len, &key))
                .or_default() += 1;
        }
        for (bucket, n) in tally {
            self.counter(bucket).fetch_max(n, Ordering::SeqCst);
        }
        let mut enabled = FP_OVERRIDE_COUNTS;
        if table_ok {
            enabled |= FP_SERVER_ID_TABLE;
        }
        self.state
            .u32_at(STATE_FLAGS)
            .fetch_or(enabled, Ordering::SeqCst);
        self.sync_vips(vips)?;
        Ok(())
    }

    /// Lets the program reduce hashes modulo `maglev_size` without a division. Call after
    /// writing a new `LbConfig::maglev_size` (any order: the program validates the value against
    /// the live size on every packet and divides while they disagree).
    pub fn set_maglev_size(&self, maglev_size: u32) {
        let size = maglev_size.min(lb_common::MAGLEV_TABLE_SIZE);
        self.state
            .u64_at(STATE_RECIPROCAL)
            .store(maglev_reciprocal(size), Ordering::SeqCst);
    }

    /// Mirrors the enabled entries of `BATON_VIPS` into the VIP table ([`Self::sync_vip_table`]).
    pub fn sync_vips<T: Borrow<MapData>>(
        &mut self,
        vips: &HashMap<T, VipKey, VipValue>,
    ) -> Result<bool> {
        let mut keys = Vec::new();
        for kv in vips.iter() {
            let (k, v) = kv.context("reading BATON_VIPS")?;
            if v.flags & 1 != 0 {
                keys.push(k);
            }
        }
        self.sync_vip_table(&keys)
    }

    /// Makes the VIP table hold exactly `vips` (the *enabled* `BATON_VIPS` keys) and enables it;
    /// with more than [`VIP_TABLE_SLOTS`] VIPs it disables it (the program uses `BATON_VIPS`) and
    /// returns false. VIPs already in the table keep their slot, so a reader never misses one
    /// that stays while the table is rewritten.
    pub fn sync_vip_table(&mut self, vips: &[VipKey]) -> Result<bool> {
        let mut want: Vec<VipKey> = vips.iter().map(canonical_vip).collect();
        want.sort_by_key(|k| (k.family, k.addr, k.port));
        want.dedup();
        let flags = self.state.u32_at(STATE_FLAGS);
        if want.len() > VIP_TABLE_SLOTS {
            flags.fetch_and(!FP_VIP_TABLE, Ordering::SeqCst);
            return Ok(false);
        }
        let mut table = self.vip_table.get(&0, 0).unwrap_or_default();
        if flags.load(Ordering::SeqCst) & FP_VIP_TABLE == 0 {
            table = VipTable::default();
        }
        for slot in table.slots.iter_mut() {
            if slot.flags != VIP_SLOT_ENABLED || !want.contains(&slot.key) {
                *slot = VipSlot::default();
            }
        }
        for key in &want {
            if table
                .slots
                .iter()
                .any(|s| s.flags == VIP_SLOT_ENABLED && s.key == *key)
            {
                continue;
            }
            let free = table
                .slots
                .iter_mut()
                .find(|s| s.flags == 0)
                .expect("at most VIP_TABLE_SLOTS VIPs");
            *free = VipSlot {
                key: *key,
                flags: VIP_SLOT_ENABLED,
            };
        }
        table.count = table
            .slots
            .iter()
            .rposition(|s| s.flags == VIP_SLOT_ENABLED)
            .map_or(0, |i| i as u32 + 1);
        self.vip_table
            .set(0, table, 0)
            .context("writing BATON_VIP_TABLE")?;
        flags.fetch_or(FP_VIP_TABLE, Ordering::SeqCst);
        Ok(true)
    }

    /// Records that `server_id` belongs to worker `worker` (after writing `BATON_SERVER_IDS`).
    /// Returns false when the table does not cover this server ID (longer server IDs: the
    /// program uses `BATON_SERVER_IDS`).
    pub fn set_server_id(&self, server_id: u64, worker: u32) -> bool {
        if server_id >= SERVER_ID_TABLE_SIZE as u64 {
            return false;
        }
        self.slot_worker(server_id as u32)
            .store(worker, Ordering::SeqCst);
        self.state().server_id_len <= SERVER_ID_TABLE_MAX_LEN
    }

    /// Forgets `server_id` (after deleting it from `BATON_SERVER_IDS`): its CIDs are hashed.
    pub fn remove_server_id(&self, server_id: u64) {
        if server_id < SERVER_ID_TABLE_SIZE as u64 {
            self.slot_worker(server_id as u32)
                .store(NO_WORKER, Ordering::SeqCst);
        }
    }

    /// The counter covering override `key` under the recorded layout.
    fn bucket_counter(&self, key: &CidKey) -> &AtomicU32 {
        let st = self.state();
        self.counter(override_bucket(st.cid_len, st.server_id_len, key))
    }

    fn counter(&self, bucket: OverrideBucket) -> &AtomicU32 {
        match bucket {
            OverrideBucket::ServerId(sid) => self.slot_overrides(sid),
            OverrideBucket::Other => self.state.u32_at(STATE_OTHER),
        }
    }

    /// +1 or -1 on `key`'s bucket; a decrement saturates at 0.
    fn count_override(&self, key: &CidKey, delta: i32) {
        let c = self.bucket_counter(key);
        if delta > 0 {
            c.fetch_add(1, Ordering::SeqCst);
        } else {
            let _ = c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(1))
            });
        }
    }

    /// Inserts or replaces an override in `BATON_CID_OVERRIDE`, counting it first.
    pub fn insert_override<T: BorrowMut<MapData>>(
        &self,
        overrides: &mut HashMap<T, CidKey, WorkerRef>,
        key: CidKey,
        value: WorkerRef,
    ) -> Result<()> {
        for _ in 0..8 {
            // Replacing an existing entry changes no count.
            match overrides.insert(key, value, BPF_EXIST) {
                Ok(()) => return Ok(()),
                Err(e) if errno(&e) == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).context("writing BATON_CID_OVERRIDE"),
            }
            // New entry: count before it becomes visible.
            self.count_override(&key, 1);
            match overrides.insert(key, value, BPF_NOEXIST) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.count_override(&key, -1);
                    if errno(&e) != Some(libc::EEXIST) {
                        return Err(e)
                            .context("cannot write the override (is the override map full?)");
                    }
                    // Someone else inserted it meanwhile: replace theirs.
                }
            }
        }
        bail!("BATON_CID_OVERRIDE kept changing under a concurrent writer")
    }

    /// Deletes an override; true if there was one. The count drops only after the delete.
    pub fn remove_override<T: BorrowMut<MapData>>(
        &self,
        overrides: &mut HashMap<T, CidKey, WorkerRef>,
        key: &CidKey,
    ) -> Result<bool> {
        match overrides.remove(key) {
            Ok(()) => {
                self.count_override(key, -1);
                Ok(true)
            }
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e).context("deleting from BATON_CID_OVERRIDE"),
        }
    }
}

/// The key the program builds from a packet: IPv4 in the first 4 bytes, the rest and pad zero.
fn canonical_vip(k: &VipKey) -> VipKey {
    let mut k = *k;
    if k.family == AF_INET {
        k.addr[4..].fill(0);
    }
    k._pad = 0;
    k
}

fn errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}
