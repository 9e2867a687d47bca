//! The daemon's control socket: a Unix stream socket speaking JSON lines (one request object per
//! line, one response object per line). The CLI uses it for what the maps cannot tell (worker
//! names, health, the attach mode) and to stop the daemon before `baton-lb detach`.
//!
//! The messages are `baton_protocol::daemon`'s, in the one answer envelope:
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"data":{...}}
//! ```
//!
//! `baton migrate` and `baton drain` also report each finished migration here
//! (`migration_done`), so the daemon's `/metrics` shows the migrations of every CLI run.
use crate::controller::Controller;
use crate::dataplane::AttachInfo;
use crate::overrides::OverrideWriter;
use anyhow::{Context, Result, bail};
use baton_protocol::{ErrorKind, Failure};
use serde::Serialize;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

pub use baton_protocol::daemon::{Request, Status as DaemonStatus};

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
    /// Migrations the CLI orchestrated and reported (`/metrics`).
    pub migrations: Mutex<baton_orchestrator::MigrationStats>,
    /// The node's convergence from etcd (only moves with `[cluster]`).
    pub cluster: Arc<crate::cluster::ClusterStats>,
}

impl Shared {
    pub fn status(&self) -> DaemonStatus {
        let ctl = self.ctl.lock().unwrap();
        let workers = ctl.status();
        let cid = baton_protocol::worker::CidLayout {
            cid_len: ctl.cfg.layout.cid_len() as u8,
            server_id_len: ctl.cfg.layout.server_id_len() as u8,
        };
        let cluster = ctl.cfg.cluster.as_ref().map(|c| self.cluster.status(c));
        drop(ctl);
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
            cid,
            cluster,
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
                    Ok(Request::Status {}) => ok(&shared.status()),
                    Ok(Request::Workers {}) => ok(&shared.status().workers),
                    Ok(Request::OverrideSet { cid, worker }) => {
                        respond(override_set(&shared, cid.as_bytes(), worker))
                    }
                    Ok(Request::OverrideDel { cid }) => {
                        respond(override_del(&shared, cid.as_bytes()))
                    }
                    Ok(Request::MigrationDone(record)) => {
                        shared.migrations.lock().unwrap().record(&record);
                        ok(&true)
                    }
                    Ok(Request::Shutdown {}) => {
                        tracing::info!("shutdown requested over the control socket");
                        shared.shutdown.notify_one();
                        ok(&"shutting down")
                    }
                    Err(e) => Err(Failure::new(ErrorKind::Config, format!("bad request: {e}"))),
                };
                let out = baton_protocol::encode_answer(&resp);
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Serialised with the controller's own map updates (its lock), ending in the one override
/// writer ([`OverrideWriter::write`]).
fn override_set(shared: &Shared, cid: &[u8], worker: u32) -> Result<serde_json::Value> {
    let mut ctl = shared.ctl.lock().unwrap();
    let cid_len = ctl.cfg.layout.cid_len();
    crate::controller::override_key(cid, cid_len)?;
    if !ctl.workers.iter().any(|w| w.index == worker) {
        bail!("worker slot {worker} is not in use");
    }
    OverrideWriter::write(&mut ctl.maps, cid_len, cid, worker)?;
    tracing::info!(cid = %crate::controller::hex(cid), worker, "override set");
    Ok(serde_json::to_value(baton_protocol::daemon::OverrideSet {
        worker_index: worker,
    })?)
}

fn override_del(shared: &Shared, cid: &[u8]) -> Result<serde_json::Value> {
    let mut ctl = shared.ctl.lock().unwrap();
    let removed = OverrideWriter::erase(&mut ctl.maps, cid)?;
    if removed {
        tracing::info!(cid = %crate::controller::hex(cid), "override removed");
    }
    Ok(serde_json::to_value(
        baton_protocol::daemon::OverrideRemoved { removed },
    )?)
}

fn respond(r: Result<serde_json::Value>) -> Result<serde_json::Value, Failure> {
    r.map_err(|e| Failure::new(ErrorKind::Override, format!("{e:#}")))
}

fn ok<T: Serialize>(v: &T) -> Result<serde_json::Value, Failure> {
    Ok(serde_json::to_value(v).expect("answers serialize"))
}

/// What the daemon's control socket gave a request.
#[derive(Debug)]
pub enum Reply {
    /// The daemon answered `ok`.
    Answered(serde_json::Value),
    /// No daemon listens: no socket file, or a stale one nobody accepts on (a daemon that was
    /// killed). Forwarding goes on from the pinned maps.
    NotRunning,
    /// A daemon took the request and went away before answering (reset, EOF): it was stopping or
    /// restarting. Still so after brief retries, or no daemon listened on the last try. Whether a
    /// write it took was applied is unknown; the pinned maps are the truth.
    WentAway(String),
}

/// Why a request got no usable answer, when it is not one of [`Reply`]'s "no daemon" cases.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("permission denied on the control socket {0}: run as root")]
    PermissionDenied(PathBuf),
    /// The daemon holds the connection but does not answer (stalled): a write may or may not
    /// have been applied.
    #[error("baton-lb did not answer within {}s on {}", .timeout.as_secs(), .path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    /// The daemon answered and said no: nothing changed.
    #[error("baton-lb refused: {0}")]
    Refused(String),
    #[error("unreadable answer from baton-lb: {0}")]
    Unreadable(String),
    #[error("cannot talk to baton-lb on {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How long one answer may take, and the pauses between tries after a daemon went away mid-request
/// (about 0.9 s in all: a restart's socket is back within that, or the caller uses the pins).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_PAUSES_MS: [u64; 3] = [100, 250, 550];

/// Client side (blocking; the CLI is synchronous). Retries a [`Request::retryable`] request whose
/// daemon went away mid-request, briefly; see [`Reply`] for what the caller gets.
pub fn ask(path: &Path, req: &Request) -> Result<Reply, ControlError> {
    let mut pauses = RETRY_PAUSES_MS.iter();
    let mut went_away: Option<String> = None;
    loop {
        match ask_once(path, req)? {
            Once::Answered(v) => return Ok(Reply::Answered(v)),
            Once::NotRunning => {
                return Ok(match went_away {
                    Some(why) => Reply::WentAway(format!("{why}; then no baton-lb listened")),
                    None => Reply::NotRunning,
                });
            }
            Once::WentAway(why) => {
                let pause = pauses.next().filter(|_| req.retryable());
                went_away = Some(why);
                match pause {
                    Some(ms) => std::thread::sleep(Duration::from_millis(*ms)),
                    None => return Ok(Reply::WentAway(went_away.unwrap_or_default())),
                }
            }
        }
    }
}

enum Once {
    Answered(serde_json::Value),
    NotRunning,
    WentAway(String),
}

fn ask_once(path: &Path, req: &Request) -> Result<Once, ControlError> {
    use std::io::ErrorKind::*;
    let io = |source: std::io::Error| ControlError::Io {
        path: path.into(),
        source,
    };
    // The daemon closing or resetting the connection under us: it is stopping or restarting.
    let gone = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
        )
    };
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), NotFound | ConnectionRefused) => return Ok(Once::NotRunning),
        Err(e) if e.kind() == PermissionDenied => {
            return Err(ControlError::PermissionDenied(path.into()));
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(req).expect("a control request serialises");
    line.push(b'\n');
    if let Err(e) = (&stream).write_all(&line) {
        return if gone(&e) {
            Ok(Once::WentAway(format!(
                "baton-lb went away mid-request ({e})"
            )))
        } else {
            Err(io(e))
        };
    }
    let mut resp = String::new();
    match BufReader::new(&stream).read_line(&mut resp) {
        // EOF before a whole line: closed while (or before) answering.
        Ok(_) if !resp.ends_with('\n') => {
            return Ok(Once::WentAway(
                "baton-lb went away mid-request (it closed the connection without answering)"
                    .into(),
            ));
        }
        Ok(_) => {}
        Err(e) if gone(&e) => {
            return Ok(Once::WentAway(format!(
                "baton-lb went away mid-request ({e})"
            )));
        }
        Err(e) if matches!(e.kind(), WouldBlock | TimedOut) => {
            return Err(ControlError::Timeout {
                path: path.into(),
                timeout: ANSWER_TIMEOUT,
            });
        }
        Err(e) => return Err(io(e)),
    }
    match baton_protocol::decode_answer::<serde_json::Value>(resp.as_bytes()) {
        Ok(Ok(v)) => Ok(Once::Answered(v)),
        Ok(Err(f)) => Err(ControlError::Refused(f.message)),
        Err(e) => Err(ControlError::Unreadable(e)),
    }
}

/// [`ask`] for callers that only need "the answer, or no daemon": a daemon that went away counts
/// as none.
pub fn request(path: &Path, req: &Request) -> Result<Option<serde_json::Value>> {
    Ok(match ask(path, req)? {
        Reply::Answered(v) => Some(v),
        Reply::NotRunning | Reply::WentAway(_) => None,
    })
}

#[cfg(test)]
mod tests {
    //! The client against scripted daemons on a real Unix socket: each accepted connection reads
    //! the request line and then does what its script says.
    use super::*;
    use std::os::unix::net::UnixListener as StdListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    enum Act {
        /// Close without answering (a daemon stopping between accept and answer).
        Close,
        /// Write half an answer, then close.
        Half,
        Answer(&'static str),
    }

    /// Serves one scripted act per connection (the last repeats); returns the socket path and
    /// how many connections were accepted.
    fn daemon(script: Vec<Act>) -> (tempdir::Dir, PathBuf, Arc<AtomicUsize>) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("control.socket");
        let l = StdListener::bind(&path).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let count = n.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let i = count.fetch_add(1, Ordering::SeqCst);
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                match &script[i.min(script.len() - 1)] {
                    Act::Close => {}
                    Act::Half => s.write_all(b"{\"ok\":tr").unwrap(),
                    Act::Answer(a) => s.write_all(format!("{a}\n").as_bytes()).unwrap(),
                }
            }
        });
        (dir, path, n)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "baton-control-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn no_socket_and_stale_socket_mean_not_running() {
        let dir = tempdir::Dir::new();
        let missing = dir.0.join("none.socket");
        assert!(matches!(
            ask(&missing, &Request::Status {}),
            Ok(Reply::NotRunning)
        ));
        // A killed daemon leaves its socket file; nobody accepts on it.
        let stale = dir.0.join("stale.socket");
        drop(StdListener::bind(&stale).unwrap());
        assert!(matches!(
            ask(&stale, &Request::Status {}),
            Ok(Reply::NotRunning)
        ));
    }

    #[test]
    fn a_daemon_that_goes_away_is_retried_then_reported() {
        let (_d, path, n) = daemon(vec![Act::Close]);
        match ask(&path, &Request::Status {}) {
            Ok(Reply::WentAway(why)) => assert!(why.contains("went away"), "{why}"),
            other => panic!("expected WentAway, got {other:?}"),
        }
        assert_eq!(n.load(Ordering::SeqCst), 1 + RETRY_PAUSES_MS.len());
        // Half an answer is no answer either.
        let (_d, path, _) = daemon(vec![Act::Half]);
        assert!(matches!(
            ask(&path, &Request::Workers {}),
            Ok(Reply::WentAway(_))
        ));
    }

    #[test]
    fn the_restarted_daemon_answers_the_retry() {
        let (_d, path, n) = daemon(vec![Act::Close, Act::Answer(r#"{"ok":true,"data":[1]}"#)]);
        match ask(&path, &Request::Workers {}) {
            Ok(Reply::Answered(v)) => assert_eq!(v, serde_json::json!([1])),
            other => panic!("expected the retry's answer, got {other:?}"),
        }
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn shutdown_is_never_sent_twice() {
        let (_d, path, n) = daemon(vec![Act::Close, Act::Answer(r#"{"ok":true}"#)]);
        assert!(matches!(
            ask(&path, &Request::Shutdown {}),
            Ok(Reply::WentAway(_))
        ));
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_refusal_is_an_error_that_names_it() {
        let (_d, path, _) = daemon(vec![Act::Answer(
            r#"{"ok":false,"error":"worker slot 9 is not in use"}"#,
        )]);
        let req = Request::OverrideSet {
            cid: "01".parse().unwrap(),
            worker: 9,
        };
        match ask(&path, &req) {
            Err(ControlError::Refused(why)) => assert!(why.contains("slot 9"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
