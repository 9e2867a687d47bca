//! The daemon's control socket: a Unix stream socket speaking JSON lines (one request object per
//! line, one response object per line). The CLI uses it for what the maps cannot tell (worker
//! names, health, the attach mode) and to stop the daemon before `baton-lb detach`.
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"data":{...}}
//! ```
use crate::controller::{Controller, WorkerStatus};
use crate::dataplane::AttachInfo;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Workers,
    /// Ask the daemon to exit (the XDP program stays attached).
    Shutdown,
    /// Send the CID (hex, the configured length) to worker slot `worker`. Through the daemon,
    /// override writes are serialised with its own map updates (e.g. the fast-path rebuild).
    OverrideSet {
        cid: String,
        worker: u32,
    },
    /// Remove the override for the CID (hex); answers `{"removed": bool}`.
    OverrideDel {
        cid: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    pub interface: String,
    pub mode: String,
    pub program: String,
    pub prog_id: u32,
    pub link_id: u32,
    pub readopted: bool,
    pub uptime_secs: u64,
    pub workers: Vec<WorkerStatus>,
}

pub struct Shared {
    pub ctl: Arc<Mutex<Controller>>,
    pub attach: AttachInfo,
    pub config_path: PathBuf,
    pub pin_dir: PathBuf,
    pub started: std::time::Instant,
    pub shutdown: tokio::sync::Notify,
    pub metrics: Option<std::net::SocketAddr>,
    /// Held for the daemon's lifetime: the loaded object (program fd, log ring buffer) and the
    /// pin-directory lock.
    pub keep: Mutex<Vec<Box<dyn std::any::Any + Send>>>,
}

impl Shared {
    pub fn status(&self) -> DaemonStatus {
        let workers = self.ctl.lock().unwrap().status();
        DaemonStatus {
            pid: std::process::id(),
            config: self.config_path.clone(),
            pin_dir: self.pin_dir.clone(),
            interface: self.attach.interface.clone(),
            mode: self.attach.mode.to_string(),
            program: self.attach.program.clone(),
            prog_id: self.attach.prog_id,
            link_id: self.attach.link_id,
            readopted: self.attach.readopted,
            uptime_secs: self.started.elapsed().as_secs(),
            workers,
        }
    }
}

/// Binds the control socket. A socket file that nobody answers on is left over from a crash
/// and is replaced; one that answers means another daemon is running.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "another baton-lb is already running (its control socket {} answers): stop it first, \
                 or give this one its own control.socket and --pin-dir",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot bind the control socket {}", path.display()))?;
    // Root-only: the socket can stop the daemon.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Status) => ok(&shared.status()),
                    Ok(Request::Workers) => ok(&shared.status().workers),
                    Ok(Request::OverrideSet { cid, worker }) => {
                        respond(override_set(&shared, &cid, worker))
                    }
                    Ok(Request::OverrideDel { cid }) => respond(override_del(&shared, &cid)),
                    Ok(Request::Shutdown) => {
                        tracing::info!("shutdown requested over the control socket");
                        shared.shutdown.notify_one();
                        ok(&"shutting down")
                    }
                    Err(e) => Response {
                        ok: false,
                        data: None,
                        error: Some(format!("bad request: {e}")),
                    },
                };
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
}

fn override_set(shared: &Shared, cid: &str, worker: u32) -> Result<serde_json::Value> {
    let mut ctl = shared.ctl.lock().unwrap();
    let cid = crate::controller::parse_hex(cid).context("the CID is not hex")?;
    let key = crate::controller::override_key(&cid, ctl.cfg.layout.cid_len())?;
    if !ctl.workers.iter().any(|w| w.index == worker) {
        bail!("worker slot {worker} is not in use");
    }
    ctl.maps.set_override(key, worker)?;
    tracing::info!(cid = %crate::controller::hex(&cid), worker, "override set");
    Ok(serde_json::json!({"worker_index": worker}))
}

fn override_del(shared: &Shared, cid: &str) -> Result<serde_json::Value> {
    let mut ctl = shared.ctl.lock().unwrap();
    let cid = crate::controller::parse_hex(cid).context("the CID is not hex")?;
    let key = lb_common::CidKey::new(&cid).context("CID longer than 20 bytes")?;
    let removed = ctl.maps.remove_override(&key)?;
    if removed {
        tracing::info!(cid = %crate::controller::hex(&cid), "override removed");
    }
    Ok(serde_json::json!({"removed": removed}))
}

fn respond(r: Result<serde_json::Value>) -> Response {
    match r {
        Ok(v) => Response {
            ok: true,
            data: Some(v),
            error: None,
        },
        Err(e) => Response {
            ok: false,
            data: None,
            error: Some(format!("{e:#}")),
        },
    }
}

fn ok<T: Serialize>(v: &T) -> Response {
    Response {
        ok: true,
        data: serde_json::to_value(v).ok(),
        error: None,
    }
}

/// Client side (blocking; the CLI is synchronous). `Ok(None)` when no daemon listens.
pub fn request(path: &Path, req: &Request) -> Result<Option<serde_json::Value>> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            bail!(
                "permission denied on the control socket {}: run as root",
                path.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot connect to {}", path.display())),
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut resp = String::new();
    BufReader::new(&stream)
        .read_line(&mut resp)
        .context("the daemon did not answer")?;
    let resp: Response =
        serde_json::from_str(&resp).context("unreadable answer from the daemon")?;
    if !resp.ok {
        bail!("the daemon refused: {}", resp.error.unwrap_or_default());
    }
    Ok(Some(resp.data.unwrap_or(serde_json::Value::Null)))
}
