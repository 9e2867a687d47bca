//! What the end-to-end suites (`stall`, `drain`) share: the netns lab with baton-lb and two
//! workers brought up by the demo's code (torn down again when the [`Lab`] guard drops, also on
//! error or panic), a `baton-load` in the client namespace, and `baton` CLI calls.
use crate::demo::{self, Load, Run};
use crate::lab;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) fn say(tag: &str, msg: impl AsRef<str>) {
    eprintln!("[bench {tag}] {}", msg.as_ref());
}

/// Wall-clock time in microseconds since the Unix epoch: the clock baton-load's `--gap-log` uses.
pub(crate) fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The lab, baton-lb and both workers; everything is stopped and removed on drop.
pub(crate) struct Lab {
    pub(crate) run: Run,
    /// Files outside the state directory to remove on drop.
    extra_files: Vec<PathBuf>,
}

impl Lab {
    /// Brings the lab up and starts baton-lb with `lb_config` and both workers (migrations on);
    /// with `http3` the workers serve the HTTP/3 proxy with an upstream beside each, as
    /// `cargo xtask demo --http3` runs them.
    pub(crate) fn up(
        bins: &Path,
        lb_config: &Path,
        extra_files: Vec<PathBuf>,
        http3: bool,
    ) -> Result<Lab> {
        demo::preflight(bins, |m| say("lab", m))?;
        say("lab", "bringing the lab up");
        lab::up_quiet()?;
        // From here on the guard tears everything down, whatever happens.
        let mut lab = Lab {
            run: Run::new(bins.to_path_buf()),
            extra_files,
        };
        if http3 {
            lab.run.serve_http3();
        }
        let up = lab.run.bring_up(Some(lb_config), true).and_then(|()| {
            if http3 {
                lab.run.start_upstreams()
            } else {
                Ok(())
            }
        });
        if let Err(e) = up {
            lab.run.show_logs();
            return Err(e);
        }
        Ok(lab)
    }

    /// `baton --json ARGS`, parsed ([`Run::baton_json`]).
    pub(crate) fn baton_json(&self, args: &[&str]) -> Result<Value> {
        self.run.baton_json(args)
    }

    /// Every connection on every worker: (conn key, worker, client address).
    pub(crate) fn conns(&self) -> Result<Vec<ConnRow>> {
        let v = self.baton_json(&["conns"])?;
        let list = v
            .as_array()
            .context("`baton conns --json` is not an array")?;
        Ok(list
            .iter()
            .map(|c| ConnRow {
                conn: c["conn"].as_str().unwrap_or_default().to_string(),
                worker: c["worker"].as_str().unwrap_or_default().to_string(),
                remote: c["remote"].as_str().unwrap_or_default().to_string(),
                cids: c["cids"].as_array().map_or(0, Vec::len),
            })
            .collect())
    }

    /// pid of the baton-lb process we started.
    pub(crate) fn lb_pid(&self) -> Option<u32> {
        self.run
            .children
            .iter()
            .find(|(n, _)| n == "baton-lb")
            .map(|(_, c)| c.id())
    }

    /// Starts `baton-load` (see [`Run::start_load`]); its text summary is not echoed.
    pub(crate) fn start_load(&mut self, tag: &'static str, args: &[String]) -> Result<Load> {
        say(tag, format!("starting baton-load {}", args.join(" ")));
        self.run.start_load(args, false)
    }

    /// Waits for baton-load's `ready` line (see [`Run::wait_ready`]).
    pub(crate) fn wait_ready(
        &mut self,
        tag: &'static str,
        load: &Load,
        connections: usize,
        limit: Duration,
    ) -> Result<HashMap<String, usize>> {
        self.run
            .wait_ready(load, connections, limit, |m| say(tag, m))
    }

    pub(crate) fn stop_load(&mut self, load: Load, limit: Duration) -> Result<Value> {
        self.run.stop_load(load, limit)
    }

    /// Kills a baton-load that a failed measurement left running (its summary is not needed).
    pub(crate) fn kill_load(&mut self) {
        if let Some(pos) = self
            .run
            .children
            .iter()
            .position(|(n, _)| n == "baton-load")
        {
            let (_, mut child) = self.run.children.remove(pos);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let state = self.run.state.clone();
        if let Err(e) = demo::teardown_everything(&state, Some(&mut self.run)) {
            say("lab", format!("teardown: {e:#}"));
        }
        for f in &self.extra_files {
            let _ = std::fs::remove_file(f);
        }
    }
}

pub(crate) struct ConnRow {
    pub(crate) conn: String,
    pub(crate) worker: String,
    pub(crate) remote: String,
    /// How many CIDs the worker lists for it (each is one LB override per migration).
    pub(crate) cids: usize,
}

/// Times `n` calls of one JSON-lines request on a control socket (connect, write, read the
/// answer line), in ms each: the cost of one controller round trip.
pub(crate) fn probe(socket: &Path, request: &str, n: usize) -> Result<Vec<f64>> {
    use std::io::Write;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let s = std::os::unix::net::UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        (&s).write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        if !line.contains("\"ok\":true") {
            bail!(
                "{} answered {request} with {}",
                socket.display(),
                line.trim()
            );
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(times)
}

pub(crate) fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}
