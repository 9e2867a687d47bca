//! Loading and attaching the XDP program, and re-adopting it across controller restarts.
//!
//! Pin layout under the pin directory (default `/sys/fs/bpf/baton`):
//! - one pinned map per name in [`lb_common::map_names`] (BTF-typed, so `bpftool map dump` is readable);
//! - `baton_xdp_link`: the XDP link. While it is pinned the program stays attached, with or
//!   without a running controller.
//!
//! A starting controller that finds a pinned link on its interface does not detach: it loads the
//! new program against the same pinned maps and swaps it into the existing link atomically
//! (`BPF_LINK_UPDATE`), so forwarding never stops. Detaching is `baton-lb detach`.
use crate::config::XdpModeSetting;
use crate::pinned::LINK_PIN_NAME;
use crate::sys;
use anyhow::{Context, Result, bail};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use serde::Serialize;
use std::path::{Path, PathBuf};

pub use crate::object::PROGRAM;

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    Native,
    Skb,
    Hw,
    Unknown,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Skb => "skb (generic)",
            AttachedMode::Hw => "hw offload",
            AttachedMode::Unknown => "unknown",
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct AttachInfo {
    pub interface: String,
    pub ifindex: u32,
    pub mode: AttachedMode,
    pub program: String,
    pub prog_id: u32,
    pub link_id: u32,
    /// True when an already-pinned link was taken over instead of attaching anew.
    pub readopted: bool,
    pub link_pin: PathBuf,
}

/// What a start does with the XDP link (see [`Dataplane::plan`]).
#[derive(Clone, Copy, Debug)]
pub enum LinkPlan {
    /// Nothing pinned: attach and pin a new link.
    New { ifindex: u32 },
    /// Our link is pinned and attached to the interface: swap the program into it.
    Readopt { ifindex: u32, link: sys::LinkInfo },
    /// A pinned link whose interface is gone: replace it.
    ReplaceDead { ifindex: u32 },
}

/// The loaded object. Dropping it never detaches: the link lives on through its pin.
pub struct Dataplane {
    pub ebpf: Ebpf,
    pub attach: Option<AttachInfo>,
    pin_dir: PathBuf,
}

/// The attach mode and program ID of the XDP program on `ifname`, from the kernel (iproute2 JSON).
pub fn query_xdp(ifname: &str) -> (AttachedMode, Option<u32>) {
    let Ok(out) = std::process::Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", ifname])
        .output()
    else {
        return (AttachedMode::Unknown, None);
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return (AttachedMode::Unknown, None);
    };
    let xdp = v.get(0).and_then(|l| l.get("xdp"));
    let mode = match xdp.and_then(|x| x.get("mode")).and_then(|m| m.as_u64()) {
        Some(1) => AttachedMode::Native,
        Some(2) => AttachedMode::Skb,
        Some(3) => AttachedMode::Hw,
        _ => AttachedMode::Unknown,
    };
    let prog = xdp
        .and_then(|x| x.get("prog"))
        .and_then(|p| p.get("id"))
        .and_then(|i| i.as_u64())
        .map(|i| i as u32);
    (mode, prog)
}

/// The attach mode of the XDP program on `ifname`.
pub fn query_mode(ifname: &str) -> AttachedMode {
    query_xdp(ifname).0
}

/// A pinned map whose key/value sizes, entries or flags differ from the object's definition.
pub(crate) struct Mismatch {
    pub name: String,
    pub path: PathBuf,
    /// What differs, for an error message.
    pub describe: String,
}

/// The pinned maps under `pin_dir` that do not match the object's definitions (read-only):
/// aya re-adopts a pinned map by name without comparing layouts, and a mismatch would corrupt
/// routing. Maps the object defines but `pin_dir` lacks are not listed.
pub(crate) fn pinned_mismatches(obj: &aya_obj::Object, pin_dir: &Path) -> Result<Vec<Mismatch>> {
    let mut out = Vec::new();
    for (name, map) in &obj.maps {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("cannot inspect the pinned map {}", path.display()))?;
        let (want_k, want_v, want_n) = (map.key_size(), map.value_size(), map.max_entries());
        // The kernel adds program-access flags of its own (a DEVMAP reports BPF_F_RDONLY_PROG).
        const KERNEL_SET: u32 = 0x80 | 0x100;
        let same = info.key_size() == want_k
            && info.value_size() == want_v
            && info.max_entries() == want_n
            && info.map_flags() & !KERNEL_SET == map.map_flags() & !KERNEL_SET;
        if !same {
            let describe = format!(
                "the pinned map {} (key {} B, value {} B, {} entries, flags {:#x}) does not match this build's \
                 {name} (key {want_k} B, value {want_v} B, {want_n} entries, flags {:#x})",
                path.display(),
                info.key_size(),
                info.value_size(),
                info.max_entries(),
                info.map_flags(),
                map.map_flags()
            );
            out.push(Mismatch {
                name: name.clone(),
                path,
                describe,
            });
        }
    }
    Ok(out)
}

/// Checks pinned maps left by an earlier run against the object's definitions (see
/// [`pinned_mismatches`]); derived fast-path maps of another layout are removed, to be recreated.
fn check_pinned_compatible(object: &[u8], pin_dir: &Path) -> Result<()> {
    let obj = aya_obj::Object::parse(object).context("the embedded XDP object does not parse")?;
    for m in pinned_mismatches(&obj, pin_dir)? {
        if crate::fastpath::MAPS.contains(&m.name.as_str()) {
            // Derived maps hold nothing the controller cannot rebuild: replace the pin. The running
            // program keeps its old map until the new one is swapped in, which starts with the
            // fast path off (hash maps only) until the controller's rebuild.
            tracing::info!(map = %m.name, "the pinned fast-path map has another layout: recreating it");
            std::fs::remove_file(&m.path)
                .with_context(|| format!("cannot remove {}", m.path.display()))?;
            continue;
        }
        if m.name == lb_common::map_names::STATS {
            // Counters only (the program writes them): older builds sized the map to their
            // verdicts. A new one starts from zero, which Prometheus reads as a counter reset.
            tracing::info!(map = %m.name, "the pinned counters map has another size: recreating it (counters restart)");
            std::fs::remove_file(&m.path)
                .with_context(|| format!("cannot remove {}", m.path.display()))?;
            continue;
        }
        bail!(
            "{}: it was made by an incompatible Baton. Run `baton-lb detach` (forwarding stops) and start again",
            m.describe
        );
    }
    Ok(())
}

impl Dataplane {
    /// Loads the object with its maps pinned (or re-adopted) under `pin_dir`. Does not attach.
    pub fn load(object: &[u8], pin_dir: &Path) -> Result<Self> {
        sys::ensure_pin_dir(pin_dir)?;
        check_pinned_compatible(object, pin_dir)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        // Also by explicit path, so the pin names hold even if a map were declared without pinning.
        let paths: Vec<(&str, PathBuf)> = crate::pinned::ALL_MAPS
            .iter()
            .map(|n| (*n, pin_dir.join(n)))
            .collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader
            .load(object)
            .context("loading the XDP object into the kernel failed")?;
        Ok(Self {
            ebpf,
            attach: None,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// Starts forwarding aya-log records from the program into `tracing`.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<BpfLogBridge>> {
        match aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, BpfLogBridge) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!(error = %e, "the XDP program emits no aya-log records");
                None
            }
        }
    }

    /// Decides, before anything is written to the maps, whether this start attaches anew or takes
    /// over the pinned link, and refuses when the pinned link belongs to another interface (a
    /// second instance sharing the pin directory must not overwrite the first one's maps).
    pub fn plan(&self, interface: &str) -> Result<LinkPlan> {
        let ifindex = sys::if_nametoindex(interface).with_context(|| {
            format!("interface {interface:?} does not exist in this network namespace (check `interface` in the config, or --netns)")
        })?;
        let link_pin = self.pin_dir.join(LINK_PIN_NAME);
        let Some(info) = sys::pinned_link_info(&link_pin)? else {
            return Ok(LinkPlan::New { ifindex });
        };
        if info.link_type == sys::BPF_LINK_TYPE_XDP && info.ifindex == 0 {
            return Ok(LinkPlan::ReplaceDead { ifindex });
        }
        // Link info carries an ifindex but no namespace: besides the index, the program on *our*
        // interface must be the link's.
        let (_, on_iface) = query_xdp(interface);
        if info.link_type == sys::BPF_LINK_TYPE_XDP
            && info.ifindex == ifindex
            && on_iface == Some(info.prog_id)
        {
            return Ok(LinkPlan::Readopt {
                ifindex,
                link: info,
            });
        }
        bail!(
            "the XDP link pinned at {} (ifindex {}, program {}) is not attached to {interface} in this network \
             namespace (ifindex {ifindex}, {}): it belongs to another interface or namespace. Give this instance \
             its own --pin-dir, fix `interface`, or remove the other one with `baton-lb detach --pin-dir {}`",
            link_pin.display(),
            info.ifindex,
            info.prog_id,
            on_iface
                .map(|i| format!("program {i}"))
                .unwrap_or_else(|| "no XDP program".into()),
            self.pin_dir.display()
        );
    }

    /// Attaches the routing program per `plan`: anew, or by swapping it into the pinned link
    /// without a gap.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: XdpModeSetting,
        plan: LinkPlan,
    ) -> Result<AttachInfo> {
        let link_pin = self.pin_dir.join(LINK_PIN_NAME);
        let program: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .with_context(|| format!("the XDP object has no program {PROGRAM:?}"))?
            .try_into()?;
        program
            .load()
            .context("the kernel rejected the XDP program (verifier)")?;
        let prog_id = program.info()?.id();

        let (ifindex, link_id, readopted, attached_mode) = match plan {
            LinkPlan::Readopt { ifindex, link } => {
                let pinned = PinnedLink::from_pin(&link_pin)?;
                let fd_link: FdLink = pinned.into();
                let xdp_link = aya::programs::xdp::XdpLink::try_from(fd_link)?;
                let id = program
                    .attach_to_link(xdp_link)
                    .context("replacing the program in the pinned XDP link failed")?;
                // Let go of our handle: the pin keeps the link (and the new program) attached.
                drop(program.take_link(id)?);
                let current = query_mode(interface);
                let differs = matches!(
                    (mode, current),
                    (XdpModeSetting::Native, AttachedMode::Skb)
                        | (XdpModeSetting::Skb, AttachedMode::Native)
                );
                if differs {
                    tracing::warn!(
                        requested = %mode, attached = %current,
                        "keeping the existing link's attach mode (changing it needs `baton-lb detach`, which stops forwarding)"
                    );
                }
                (ifindex, link.id, true, current)
            }
            LinkPlan::ReplaceDead { ifindex } => {
                tracing::warn!(pin = %link_pin.display(), "the pinned XDP link's interface no longer exists: replacing it");
                std::fs::remove_file(&link_pin)?;
                let (id, m) = attach_new(program, interface, mode, &link_pin)?;
                (ifindex, id, false, m)
            }
            LinkPlan::New { ifindex } => {
                let (id, m) = attach_new(program, interface, mode, &link_pin)?;
                (ifindex, id, false, m)
            }
        };
        let info = AttachInfo {
            interface: interface.to_string(),
            ifindex,
            mode: attached_mode,
            program: PROGRAM.to_string(),
            prog_id,
            link_id,
            readopted,
            link_pin,
        };
        self.attach = Some(info.clone());
        Ok(info)
    }
}

/// True if `e` (or anything it wraps) is an OS error with one of `codes`.
fn has_os_error(e: &(dyn std::error::Error + 'static), codes: &[i32]) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error().is_some_and(|c| codes.contains(&c)) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

fn occupied(interface: &str, link_pin: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "another XDP program is already attached to {interface} (it is not the Baton link pinned at {}). \
         Remove it first: `ip link set dev {interface} xdp off`, or `baton-lb detach --pin-dir DIR` if \
         another Baton instance with its own pin directory owns it",
        link_pin.display()
    )
}

fn attach_new(
    program: &mut Xdp,
    interface: &str,
    mode: XdpModeSetting,
    link_pin: &Path,
) -> Result<(u32, AttachedMode)> {
    const BUSY: [i32; 2] = [libc::EEXIST, libc::EBUSY];
    let try_attach = |program: &mut Xdp, m: XdpMode, hint: &str| match program.attach(interface, m)
    {
        Ok(id) => Ok(id),
        Err(e) if has_os_error(&e, &BUSY) => Err(occupied(interface, link_pin)),
        Err(e) => Err(anyhow::Error::from(e).context(hint.to_string())),
    };
    let (id, attached) = match mode {
        XdpModeSetting::Native => (
            try_attach(
                program,
                XdpMode::Driver,
                &format!(
                    "native XDP attach to {interface} failed: if the driver has no XDP support, use xdp_mode = \"skb\" or \"auto\""
                ),
            )?,
            AttachedMode::Native,
        ),
        XdpModeSetting::Skb => (
            try_attach(
                program,
                XdpMode::Skb,
                &format!("generic XDP attach to {interface} failed"),
            )?,
            AttachedMode::Skb,
        ),
        XdpModeSetting::Auto => match program.attach(interface, XdpMode::Driver) {
            Ok(id) => (id, AttachedMode::Native),
            Err(e) if has_os_error(&e, &BUSY) => return Err(occupied(interface, link_pin)),
            Err(e) => {
                tracing::warn!(%interface, error = %e, "native XDP is not available here: falling back to generic (skb) mode, which is slower");
                (
                    try_attach(
                        program,
                        XdpMode::Skb,
                        &format!("generic XDP attach to {interface} failed too"),
                    )?,
                    AttachedMode::Skb,
                )
            }
        },
    };
    let link = program.take_link(id)?;
    let fd_link = FdLink::try_from(link).context(
        "the kernel attached XDP through netlink, not a BPF link, so it cannot be pinned (Linux >= 5.9 is required)",
    )?;
    let link_id = fd_link.info().map(|i| i.id()).unwrap_or(0);
    // The pin holds the attachment from now on; our fd can close.
    let pinned = fd_link
        .pin(link_pin)
        .with_context(|| format!("cannot pin the XDP link at {}", link_pin.display()))?;
    drop(pinned);
    tracing::info!(%interface, mode = %attached, link = %link_pin.display(), "attached the XDP program");
    Ok((link_id, attached))
}

/// Forwards `log` records from aya-log (the XDP program's `info!` etc.) into `tracing`.
pub struct BpfLogBridge;

impl log::Log for BpfLogBridge {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let _ = tracing_log::format_trace(record);
    }
    fn flush(&self) {}
}

/// Takes the program off the interface and removes every pin (maps included). Forwarding stops.
pub fn detach(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let link_pin = pin_dir.join(LINK_PIN_NAME);
    if let Some(info) = sys::pinned_link_info(&link_pin)? {
        tracing::info!(
            link_id = info.id,
            prog_id = info.prog_id,
            ifindex = info.ifindex,
            "detaching the XDP link"
        );
    }
    crate::pinned::unpin_all(pin_dir)
}
