//! The worker's control socket: a Unix stream socket (mode 0600) speaking JSON lines, one request
//! per line, one answer per line (`{"ok":true,"data":..}` or `{"ok":false,"kind":..,"error":..}`).
//! Contract: `docs/MIGRATION-FLOW.md`. State-changing requests carry a migration token.
use crate::hex;
use crate::migrate::{Ctx, Failure, MigrateOut};
use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Info,
    Conns,
    MigrateOut(MigrateOut),
    Release { migration_id: String },
}

/// Binds the socket; a stale file (nobody answers) is replaced, a live one is refused.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener> {
    if path.exists() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => anyhow::bail!(
                "another worker answers on {}: give this one its own control_socket",
                path.display()
            ),
            // Nobody listens: its owner is gone, the file is stale.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale control socket");
                std::fs::remove_file(path).with_context(|| {
                    format!("cannot remove the stale socket {}", path.display())
                })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Anything else (not a socket, no permission): the file may not be ours to remove.
            Err(e) => anyhow::bail!(
                "{} exists and cannot be checked ({e}); remove it if no worker uses it",
                path.display()
            ),
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(listener: tokio::net::UnixListener, ctx: Arc<Ctx>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => match handle(&ctx, req).await {
                        Ok(data) => json!({"ok": true, "data": data}),
                        Err(f) => json!({"ok": false, "kind": f.kind, "error": f.message}),
                    },
                    Err(e) => {
                        json!({"ok": false, "kind": "config", "error": format!("bad request: {e}")})
                    }
                };
                let mut out = serde_json::to_vec(&answer).unwrap_or_default();
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn handle(ctx: &Arc<Ctx>, req: Request) -> Result<Value, Failure> {
    match req {
        Request::Info => {
            Ok(json!({"name": ctx.name, "server_id": ctx.server_id, "peer": ctx.peer_addr}))
        }
        Request::Conns => {
            let conns = ctx
                .handle
                .connections()
                .await
                .map_err(|e| Failure::new("output", e))?;
            Ok(Value::Array(
                conns
                    .iter()
                    .map(|c| {
                        json!({"conn": hex(&c.key), "id": c.id, "remote": c.remote, "frozen": c.frozen,
                               "cids": c.cids.iter().map(|x| hex(x)).collect::<Vec<_>>()})
                    })
                    .collect(),
            ))
        }
        Request::MigrateOut(m) => crate::migrate::migrate_out(ctx, m).await,
        Request::Release { migration_id } => {
            crate::migrate::release(ctx, &migration_id)?;
            Ok(json!({"released": migration_id}))
        }
    }
}
