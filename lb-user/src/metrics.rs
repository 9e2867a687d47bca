//! Prometheus metrics over a minimal HTTP/1.1 responder (GET /metrics only). Scrapes are rare and
//! tiny, so a hand-rolled responder avoids pulling in an HTTP stack.
use crate::control::Shared;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub fn render(shared: &Shared) -> String {
    let mut out = String::new();
    let ctl = shared.ctl.lock().unwrap();
    out.push_str("# HELP baton_packets_total XDP verdicts, summed over CPUs (bytes for verdict=\"bytes\").\n");
    out.push_str("# TYPE baton_packets_total counter\n");
    match ctl.maps.stats() {
        Ok(stats) => {
            for (s, v) in stats {
                let _ = writeln!(out, "baton_packets_total{{verdict=\"{}\"}} {v}", s.name());
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading the stats map failed"),
    }
    out.push_str(
        "# HELP baton_worker_healthy 1 if the worker passes its health checks.\n# TYPE baton_worker_healthy gauge\n",
    );
    let workers = ctl.status();
    for w in &workers {
        let _ = writeln!(
            out,
            "baton_worker_healthy{{worker=\"{}\",server_id=\"{}\"}} {}",
            w.name, w.server_id, w.healthy as u8
        );
    }
    out.push_str(
        "# HELP baton_maglev_slots Maglev table slots that point at the worker.\n# TYPE baton_maglev_slots gauge\n",
    );
    for w in &workers {
        let _ = writeln!(
            out,
            "baton_maglev_slots{{worker=\"{}\"}} {}",
            w.name, w.maglev_slots
        );
    }
    let overrides = ctl.maps.overrides().map(|o| o.len()).unwrap_or(0);
    let _ = writeln!(
        out,
        "# HELP baton_cid_overrides Exact-CID overrides installed.\n# TYPE baton_cid_overrides gauge\nbaton_cid_overrides {overrides}"
    );
    let _ = writeln!(
        out,
        "# HELP baton_xdp_attached Info about the attached program.\n# TYPE baton_xdp_attached gauge\nbaton_xdp_attached{{interface=\"{}\",mode=\"{}\",prog_id=\"{}\"}} 1",
        shared.attach.interface, shared.attach.mode, shared.attach.prog_id
    );
    if let Some(c) = ctl.cfg.cluster.as_ref().map(|c| shared.cluster.status(c)) {
        let _ = writeln!(
            out,
            "# HELP baton_cluster_applied_revision The etcd revision this node's maps reflect.\n\
             # TYPE baton_cluster_applied_revision gauge\n\
             baton_cluster_applied_revision{{node=\"{node}\"}} {}\n\
             # HELP baton_cluster_watching Whether the node follows etcd now (0: forwarding on the last state).\n\
             # TYPE baton_cluster_watching gauge\n\
             baton_cluster_watching{{node=\"{node}\"}} {}\n\
             # HELP baton_cluster_apply_errors_total Changes from etcd that could not be written to the maps.\n\
             # TYPE baton_cluster_apply_errors_total counter\n\
             baton_cluster_apply_errors_total{{node=\"{node}\"}} {}",
            c.applied_revision,
            u8::from(c.watching),
            c.apply_errors,
            node = c.node,
        );
    }
    drop(ctl);
    shared.migrations.lock().unwrap().render(&mut out);
    out
}

pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen for metrics (check control.metrics): metrics are off");
            return;
        }
    };
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read until the end of the request head (or the buffer is full).
            while len < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut buf[len..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => len += n,
                }
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body, ctype) =
                if head.starts_with("GET ") && (path == "/metrics" || path == "/") {
                    ("200 OK", render(&shared), "text/plain; version=0.0.4")
                } else {
                    (
                        "404 Not Found",
                        "only GET /metrics is served\n".to_string(),
                        "text/plain",
                    )
                };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}
