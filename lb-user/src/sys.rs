//! Small system helpers aya does not expose: pinned-link introspection, bpffs checks, network
//! namespaces, root checks.
use anyhow::{Context, Result, bail};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
pub const BPF_LINK_TYPE_XDP: u32 = 6;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with an actionable message unless we run as root (XDP and bpffs need CAP_BPF/CAP_NET_ADMIN,
/// and reading pinned maps needs at least CAP_BPF; root is the supported setup).
pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root (BPF maps, XDP and bpffs are privileged): run it with sudo");
    }
    Ok(())
}

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, writable buffer of the size we pass; the kernel reads/writes only
    // within it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens any pinned BPF object (map, program, link) by path.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = [0u8; 16];
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a fresh fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What the kernel says about a BPF link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// For XDP links: the interface (0 once the interface is gone).
    pub ifindex: u32,
}

pub fn link_info(fd: &OwnedFd) -> io::Result<LinkInfo> {
    // struct bpf_link_info { u32 type, id, prog_id; union (8-aligned) { ... xdp { u32 ifindex } } }
    let mut info = [0u8; 128];
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
    Ok(LinkInfo {
        link_type: u32_at(0),
        id: u32_at(4),
        prog_id: u32_at(8),
        ifindex: u32_at(16),
    })
}

/// Info about the link pinned at `path`, or `None` if nothing is pinned there.
pub fn pinned_link_info(path: &Path) -> Result<Option<LinkInfo>> {
    match obj_get(path) {
        Ok(fd) => Ok(Some(link_info(&fd).with_context(|| {
            format!("cannot query the link pinned at {}", path.display())
        })?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e)
            if e.raw_os_error() == Some(libc::EPERM) || e.raw_os_error() == Some(libc::EACCES) =>
        {
            bail!("permission denied opening {}: run as root", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("cannot open the pinned link {}", path.display())),
    }
}

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// True when this process runs in a different mount namespace than its parent or PID 1 (e.g.
/// under `ip netns exec`, which unshares the mount namespace and remounts /sys privately, hiding
/// the host's bpffs). Namespaces we cannot read (PID 1 in some sandboxes) are not counted.
pub fn in_private_mount_ns() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let Some(me) = ns("self") else { return false };
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() }.to_string();
    [parent.as_str(), "1"]
        .iter()
        .any(|p| ns(p).is_some_and(|m| m != me))
}

/// Makes sure `pin_dir` lives on the host's bpffs, mounting bpffs on its parent if nothing is
/// mounted there, and creates it.
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) {
        if in_private_mount_ns() {
            // A bpffs mounted here would be private to this mount namespace and vanish with it,
            // taking the pinned link (and so forwarding) along.
            bail!(
                "{} is not a bpffs in this mount namespace (`ip netns exec` remounts /sys privately). \
                 Start baton-lb with `--netns NAME` (or `nsenter --net=/run/netns/NAME baton-lb ...`) \
                 instead, so the pins land in the host's bpffs and survive restarts",
                parent.display()
            );
        }
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        tracing::info!(path = %parent.display(), "bpffs is not mounted: mounting it");
        let src = CString::new("bpf").unwrap();
        let target = CString::new(parent.as_os_str().as_bytes())?;
        // SAFETY: valid NUL-terminated strings; no data argument.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error()).with_context(|| {
                format!(
                    "cannot mount bpffs on {} (try `mount -t bpf bpf {}`)",
                    parent.display(),
                    parent.display()
                )
            });
        }
    }
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("cannot create the pin directory {}", pin_dir.display()))?;
    Ok(())
}

/// Takes an exclusive lock on the pin directory for as long as the returned file lives, so two
/// controllers never write the same maps. `Ok(None)` if another process holds it.
pub fn try_lock_pin_dir(pin_dir: &Path) -> Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(pin_dir)
        .with_context(|| format!("cannot open {}", pin_dir.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(e).with_context(|| format!("cannot lock {}", pin_dir.display()));
    }
    Ok(Some(f))
}

/// Moves the calling thread into the named network namespace (`/run/netns/NAME`, as made by
/// `ip netns add`). Network-namespace membership is per thread; threads spawned afterwards
/// inherit it. The mount namespace is left alone, so bpffs pins stay host-visible.
pub fn enter_netns(name: &str) -> Result<()> {
    let path = if name.contains('/') {
        name.to_string()
    } else {
        format!("/run/netns/{name}")
    };
    let f = std::fs::File::open(&path).with_context(|| {
        format!("cannot open network namespace {path} (does `ip netns list` show {name:?}?)")
    })?;
    // SAFETY: a valid fd to a netns file.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("setns into {path} failed"));
    }
    Ok(())
}

pub fn if_nametoindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

pub fn if_indextoname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf is IF_NAMESIZE bytes as required.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated string into buf.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// This host's name (`uname -n`), if it has one.
pub fn hostname() -> Option<String> {
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid utsname for uname to fill.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    // SAFETY: uname NUL-terminates nodename.
    let name = unsafe { std::ffi::CStr::from_ptr(u.nodename.as_ptr()) };
    Some(name.to_string_lossy().into_owned()).filter(|n| !n.is_empty())
}
