//! Migration counters and histograms, rendered in the Prometheus text exposition format.
//!
//! Lock-free atomics so workers and the controller can share one `Arc<MigrationMetrics>`.
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::protocol::ErrorKind;
use crate::state_machine::MigrationPhase;

/// Latency bucket upper bounds, seconds.
const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Snapshot size bucket upper bounds, bytes.
const SIZE_BOUNDS: &[f64] = &[
    1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
];

/// A fixed-bucket histogram. Observations are integers in `unit`s (microseconds or bytes) and
/// exported divided by `scale` (seconds or bytes).
pub struct Histogram {
    bounds: &'static [f64],
    scale: f64,
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_units: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64], scale: f64) -> Self {
        Self {
            bounds,
            scale,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_units: AtomicU64::new(0),
        }
    }

    fn observe_units(&self, units: u64) {
        let value = units as f64 / self.scale;
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_units.fetch_add(units, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_units.load(Relaxed) as f64 / self.scale
        );
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

const PHASES: [MigrationPhase; 5] = [
    MigrationPhase::Idle,
    MigrationPhase::Preparing,
    MigrationPhase::Transferring,
    MigrationPhase::Completed,
    MigrationPhase::Failed,
];

pub struct MigrationMetrics {
    started: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    /// preparing, transferring, total
    phase_latency: [Histogram; 3],
    snapshot_bytes: Histogram,
    errors: Vec<AtomicU64>,
    /// Indexed `from * 5 + to`.
    transitions: Vec<AtomicU64>,
}

impl Default for MigrationMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrationMetrics {
    pub fn new() -> Self {
        let latency = || Histogram::new(LATENCY_BOUNDS, 1e6);
        Self {
            started: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            phase_latency: [latency(), latency(), latency()],
            snapshot_bytes: Histogram::new(SIZE_BOUNDS, 1.0),
            errors: ErrorKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            transitions: (0..PHASES.len() * PHASES.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    pub(crate) fn record_transition(&self, from: MigrationPhase, to: MigrationPhase) {
        self.transitions[from as usize * PHASES.len() + to as usize].fetch_add(1, Relaxed);
        match to {
            MigrationPhase::Preparing => self.started.fetch_add(1, Relaxed),
            MigrationPhase::Completed => self.completed.fetch_add(1, Relaxed),
            MigrationPhase::Failed => self.failed.fetch_add(1, Relaxed),
            _ => 0,
        };
    }

    /// Time spent in `phase` (Preparing or Transferring) when leaving it.
    pub(crate) fn observe_phase(&self, phase: MigrationPhase, spent: Duration) {
        let idx = match phase {
            MigrationPhase::Preparing => 0,
            MigrationPhase::Transferring => 1,
            _ => return,
        };
        self.phase_latency[idx].observe_units(spent.as_micros() as u64);
    }

    pub(crate) fn observe_total(&self, spent: Duration) {
        self.phase_latency[2].observe_units(spent.as_micros() as u64);
    }

    /// Size of a sealed snapshot as sent over the wire.
    pub fn observe_snapshot_size(&self, bytes: u64) {
        self.snapshot_bytes.observe_units(bytes);
    }

    pub fn record_error(&self, kind: ErrorKind) {
        self.errors[kind.index()].fetch_add(1, Relaxed);
    }

    pub fn started(&self) -> u64 {
        self.started.load(Relaxed)
    }
    pub fn completed(&self) -> u64 {
        self.completed.load(Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed.load(Relaxed)
    }
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind.index()].load(Relaxed)
    }
    pub fn transitions(&self, from: MigrationPhase, to: MigrationPhase) -> u64 {
        self.transitions[from as usize * PHASES.len() + to as usize].load(Relaxed)
    }
    pub fn snapshot_size_count(&self) -> u64 {
        self.snapshot_bytes.count()
    }

    /// Completed / finished migrations; `None` before any finished.
    pub fn success_rate(&self) -> Option<f64> {
        let (ok, failed) = (self.completed(), self.failed());
        (ok + failed > 0).then(|| ok as f64 / (ok + failed) as f64)
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(8192);
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            &mut out,
            "baton_migrations_started_total",
            "Migrations that entered Preparing.",
            self.started(),
        );
        counter(
            &mut out,
            "baton_migrations_completed_total",
            "Migrations that reached Completed.",
            self.completed(),
        );
        counter(
            &mut out,
            "baton_migrations_failed_total",
            "Migrations that reached Failed.",
            self.failed(),
        );
        let _ = writeln!(
            out,
            "# HELP baton_migration_success_ratio Completed / (completed + failed); NaN before any finished.\n# TYPE baton_migration_success_ratio gauge\nbaton_migration_success_ratio {}",
            self.success_rate().unwrap_or(f64::NAN)
        );

        let name = "baton_migration_phase_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time spent per migration phase (total: start to Completed or Failed).\n# TYPE {name} histogram"
        );
        for (phase, h) in ["preparing", "transferring", "total"]
            .iter()
            .zip(&self.phase_latency)
        {
            h.render(&mut out, name, &format!("phase=\"{phase}\""));
        }

        let name = "baton_migration_snapshot_bytes";
        let _ = writeln!(
            out,
            "# HELP {name} Size of sealed snapshots sent.\n# TYPE {name} histogram"
        );
        self.snapshot_bytes.render(&mut out, name, "");

        let name = "baton_migration_errors_total";
        let _ = writeln!(
            out,
            "# HELP {name} Migration errors by kind.\n# TYPE {name} counter"
        );
        for kind in ErrorKind::ALL {
            let _ = writeln!(
                out,
                "{name}{{kind=\"{}\"}} {}",
                kind.as_str(),
                self.errors(kind)
            );
        }

        let name = "baton_migration_transitions_total";
        let _ = writeln!(
            out,
            "# HELP {name} State machine transitions taken.\n# TYPE {name} counter"
        );
        for from in PHASES {
            for to in PHASES {
                let n = self.transitions(from, to);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "{name}{{from=\"{}\",to=\"{}\"}} {n}",
                        from.as_str(),
                        to.as_str()
                    );
                }
            }
        }
        out
    }
}

impl std::fmt::Debug for MigrationMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationMetrics")
            .field("started", &self.started())
            .field("completed", &self.completed())
            .field("failed", &self.failed())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = MigrationMetrics::new();
        m.record_transition(MigrationPhase::Idle, MigrationPhase::Preparing);
        m.observe_phase(MigrationPhase::Preparing, Duration::from_millis(3));
        m.record_transition(MigrationPhase::Preparing, MigrationPhase::Failed);
        m.record_error(ErrorKind::Timeout);
        m.observe_snapshot_size(5000);
        let text = m.render_prometheus();
        assert!(text.contains("baton_migrations_started_total 1"));
        assert!(text.contains("baton_migrations_failed_total 1"));
        assert!(text.contains("baton_migration_success_ratio 0"));
        assert!(text.contains(
            "baton_migration_phase_duration_seconds_bucket{phase=\"preparing\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "baton_migration_phase_duration_seconds_bucket{phase=\"preparing\",le=\"0.0025\"} 0"
        ));
        assert!(
            text.contains("baton_migration_phase_duration_seconds_sum{phase=\"preparing\"} 0.003")
        );
        assert!(text.contains("baton_migration_snapshot_bytes_bucket{le=\"16384\"} 1"));
        assert!(text.contains("baton_migration_snapshot_bytes_count 1"));
        assert!(text.contains("baton_migration_errors_total{kind=\"timeout\"} 1"));
        assert!(
            text.contains("baton_migration_transitions_total{from=\"preparing\",to=\"failed\"} 1")
        );
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok() || value == "NaN", "{line}");
        }
    }
}
