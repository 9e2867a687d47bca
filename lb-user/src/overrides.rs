//! The one writer of exact-CID overrides (`BATON_CID_OVERRIDE`).
//!
//! Every override write, whoever starts it (`baton override set/del`, a migration's flip and
//! retirement, the daemon answering its control socket), goes through [`OverrideWriter`]: through
//! the running baton-lb when one answers, so the write is serialised with its own map updates
//! (e.g. a fast-path rebuild), else the pinned maps directly, which the program keeps using with
//! or without a daemon. Both paths end in [`OverrideWriter::write`] / [`OverrideWriter::erase`]
//! on the pinned maps (`PinnedMaps::set_override`), which keep the fast path's override counts.
//!
//! A daemon that takes the request and goes away before answering (restarting) may or may not
//! have written it; setting or removing the same override twice is harmless, so the write is then
//! finished through the pins, saying so.
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use lb_common::CidKey;

use crate::control::{self, ControlError, Reply, Request};
use crate::controller::{hex, override_key};
use crate::pinned::PinnedMaps;

/// How a write reached the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// The running baton-lb wrote it.
    Daemon,
    /// No daemon answers: written to the pinned maps directly.
    Pins,
    /// A daemon took the request and went away (the reason): finished through the pinned maps.
    PinsAfterDaemonWentAway(String),
}

/// Writes overrides through the daemon's control socket, else the pinned maps (see the module
/// docs). Shareable between threads (a drain runs several migrations at once).
pub struct OverrideWriter {
    /// `None`: never ask a daemon (the caller knows none runs).
    socket: Option<PathBuf>,
    pin_dir: PathBuf,
    /// Opened on first use.
    maps: Mutex<Option<PinnedMaps>>,
}

impl OverrideWriter {
    /// Through the daemon listening on `socket` when it answers, else the maps under `pin_dir`.
    pub fn new(socket: &Path, pin_dir: &Path) -> Self {
        Self {
            socket: Some(socket.to_path_buf()),
            pin_dir: pin_dir.to_path_buf(),
            maps: Mutex::new(None),
        }
    }

    /// Straight to the maps under `pin_dir`, never asking a daemon.
    pub fn pins_only(pin_dir: &Path) -> Self {
        Self {
            socket: None,
            pin_dir: pin_dir.to_path_buf(),
            maps: Mutex::new(None),
        }
    }

    /// Routes `cid` (exactly the configured CID length) to worker slot `worker`.
    pub fn set(&self, cid: &[u8], worker: u32) -> Result<Via> {
        // Checked here too, so a wrong length is refused the same with or without a daemon.
        let cid_len = self.with_maps(|m| Ok(m.lb_config()?.cid_len as usize))?;
        override_key(cid, cid_len)?;
        let req = Request::OverrideSet {
            cid: baton_protocol::Cid::new(cid)?,
            worker,
        };
        match self.ask(&req)? {
            Reply::Answered(_) => Ok(Via::Daemon),
            Reply::NotRunning => {
                self.with_maps(|m| Self::write(m, cid_len, cid, worker).map(drop))?;
                Ok(Via::Pins)
            }
            Reply::WentAway(why) => {
                self.with_maps(|m| Self::write(m, cid_len, cid, worker).map(drop))
                    .with_context(|| {
                        format!(
                            "{why}, and writing the pinned override map failed too: the override may or may not \
                             be set, see `baton override list`"
                        )
                    })?;
                eprintln!("note: {why}; wrote the override to the pinned maps directly");
                Ok(Via::PinsAfterDaemonWentAway(why))
            }
        }
    }

    /// Removes the override for `cid`. `true` if there was one, or if a daemon that went away
    /// mid-request may have removed it: either way none is left.
    pub fn remove(&self, cid: &[u8]) -> Result<(bool, Via)> {
        CidKey::new(cid).context("CID longer than 20 bytes")?;
        let req = Request::OverrideDel {
            cid: baton_protocol::Cid::new(cid)?,
        };
        match self.ask(&req)? {
            Reply::Answered(v) => {
                let answer: baton_protocol::daemon::OverrideRemoved = serde_json::from_value(v)
                    .context(
                        "baton-lb answered override_del with something this baton cannot read",
                    )?;
                Ok((answer.removed, Via::Daemon))
            }
            Reply::NotRunning => Ok((self.with_maps(|m| Self::erase(m, cid))?, Via::Pins)),
            Reply::WentAway(why) => {
                let removed = self.with_maps(|m| Self::erase(m, cid)).with_context(|| {
                    format!(
                        "{why}, and removing it from the pinned override map failed too: see `baton override list`"
                    )
                })?;
                if removed {
                    eprintln!("note: {why}; removed the override from the pinned maps directly");
                } else {
                    // The daemon may have removed it before it went: what matters is that it is gone.
                    eprintln!(
                        "note: {why}; the pinned maps hold no override for {} now",
                        hex(cid)
                    );
                }
                Ok((true, Via::PinsAfterDaemonWentAway(why)))
            }
        }
    }

    /// The write itself, on the pinned maps: what the daemon runs for a control-socket request
    /// and the direct path runs without one. Checks the CID against `cid_len` (the configured
    /// length: an override of another length would never match).
    pub fn write(maps: &mut PinnedMaps, cid_len: usize, cid: &[u8], worker: u32) -> Result<CidKey> {
        let key = override_key(cid, cid_len)?;
        maps.set_override(key, worker)?;
        Ok(key)
    }

    /// The removal itself, on the pinned maps (see [`Self::write`]); `false` if there was none.
    pub fn erase(maps: &mut PinnedMaps, cid: &[u8]) -> Result<bool> {
        let key = CidKey::new(cid).context("CID longer than 20 bytes")?;
        maps.remove_override(&key)
    }

    fn ask(&self, req: &Request) -> Result<Reply> {
        match &self.socket {
            Some(socket) => control::ask(socket, req).map_err(unfinished),
            None => Ok(Reply::NotRunning),
        }
    }

    fn with_maps<T>(&self, f: impl FnOnce(&mut PinnedMaps) -> Result<T>) -> Result<T> {
        let mut guard = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(PinnedMaps::open(&self.pin_dir)?);
        }
        f(guard.as_mut().expect("opened above"))
    }
}

/// A write the daemon did not finish: say whether anything changed.
fn unfinished(e: ControlError) -> anyhow::Error {
    match e {
        ControlError::Refused(why) => anyhow::anyhow!("baton-lb refused: {why}; nothing changed"),
        ControlError::Timeout { .. } | ControlError::Unreadable(_) => anyhow::anyhow!(
            "{e}: the write may or may not have been applied; see `baton override list` \
             (the pinned maps were not written directly, so as not to race a live daemon)"
        ),
        e => anyhow::anyhow!("{e}; nothing changed"),
    }
}
