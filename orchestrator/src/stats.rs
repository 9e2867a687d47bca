//! The figures of finished migrations as Prometheus metrics: success rate, latency per step and
//! in all (histograms), snapshot sizes (histogram) and failures by kind. The process that hosts
//! them (`baton-lb`, to which each `baton migrate`/`drain` reports its [`MigrationRecord`]s)
//! renders them on its `/metrics`.
use baton_protocol::ErrorKind;
use baton_protocol::daemon::{MigrationRecord, Step};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Latency buckets, milliseconds: from a sub-millisecond lab path to a long quiesce wait.
const MS_BUCKETS: [f64; 14] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];
/// Snapshot size buckets, bytes: an idle connection (~1.5 KB) to a full window (MBs).
const BYTE_BUCKETS: [f64; 10] = [
    1024.0, 2048.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];

#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            n: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.n += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.n);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.n);
    }
}

/// Every reported migration, summed.
#[derive(Clone, Debug)]
pub struct MigrationStats {
    succeeded: u64,
    failed: BTreeMap<ErrorKind, u64>,
    total_ms: Histogram,
    step_ms: BTreeMap<Step, Histogram>,
    snapshot_bytes: Histogram,
}

impl Default for MigrationStats {
    fn default() -> Self {
        Self {
            succeeded: 0,
            failed: BTreeMap::new(),
            total_ms: Histogram::new(&MS_BUCKETS),
            step_ms: Step::ALL
                .iter()
                .map(|s| (*s, Histogram::new(&MS_BUCKETS)))
                .collect(),
            snapshot_bytes: Histogram::new(&BYTE_BUCKETS),
        }
    }
}

impl MigrationStats {
    pub fn record(&mut self, r: &MigrationRecord) {
        match r.failed {
            None => {
                self.succeeded += 1;
                self.total_ms.observe(r.total_ms);
            }
            Some(kind) => *self.failed.entry(kind).or_default() += 1,
        }
        for (step, ms) in &r.steps {
            if let Some(h) = self.step_ms.get_mut(step) {
                h.observe(*ms);
            }
        }
        if r.snapshot_bytes > 0 {
            self.snapshot_bytes.observe(r.snapshot_bytes as f64);
        }
    }

    pub fn succeeded(&self) -> u64 {
        self.succeeded
    }

    pub fn failed(&self) -> u64 {
        self.failed.values().sum()
    }

    /// Prometheus text exposition of the metrics.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP baton_migrations_total Migrations orchestrated, by result (reported by baton migrate and drain).\n# TYPE baton_migrations_total counter\n");
        let _ = writeln!(
            out,
            "baton_migrations_total{{result=\"ok\"}} {}",
            self.succeeded
        );
        let _ = writeln!(
            out,
            "baton_migrations_total{{result=\"failed\"}} {}",
            self.failed()
        );
        out.push_str("# HELP baton_migration_errors_total Failed migrations by error kind.\n# TYPE baton_migration_errors_total counter\n");
        for (kind, n) in &self.failed {
            let _ = writeln!(out, "baton_migration_errors_total{{kind=\"{kind}\"}} {n}");
        }
        out.push_str("# HELP baton_migration_duration_ms Successful migrations, token to release, milliseconds.\n# TYPE baton_migration_duration_ms histogram\n");
        self.total_ms.render(out, "baton_migration_duration_ms", "");
        out.push_str("# HELP baton_migration_step_duration_ms Time in each step of a migration (resolve, authorize, transfer, flip, release), milliseconds.\n# TYPE baton_migration_step_duration_ms histogram\n");
        for (step, h) in &self.step_ms {
            h.render(
                out,
                "baton_migration_step_duration_ms",
                &format!("step=\"{}\"", step.as_str()),
            );
        }
        out.push_str("# HELP baton_migration_snapshot_bytes Sealed snapshot sizes of migrations that got that far.\n# TYPE baton_migration_snapshot_bytes histogram\n");
        self.snapshot_bytes
            .render(out, "baton_migration_snapshot_bytes", "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_counters_and_cumulative_histograms() {
        let mut s = MigrationStats::default();
        s.record(&MigrationRecord {
            failed: None,
            steps: vec![(Step::Resolve, 0.2), (Step::Transfer, 3.0)],
            snapshot_bytes: 1500,
            total_ms: 4.0,
        });
        s.record(&MigrationRecord {
            failed: Some(ErrorKind::InvalidToken),
            steps: vec![(Step::Resolve, 0.2), (Step::Transfer, 1.0)],
            snapshot_bytes: 0,
            total_ms: 1.2,
        });
        let mut out = String::new();
        s.render(&mut out);
        for line in [
            "baton_migrations_total{result=\"ok\"} 1",
            "baton_migrations_total{result=\"failed\"} 1",
            "baton_migration_errors_total{kind=\"invalid_token\"} 1",
            "baton_migration_duration_ms_bucket{le=\"2.5\"} 0",
            "baton_migration_duration_ms_bucket{le=\"5\"} 1",
            "baton_migration_duration_ms_count 1",
            "baton_migration_step_duration_ms_bucket{step=\"transfer\",le=\"1\"} 1",
            "baton_migration_step_duration_ms_bucket{step=\"transfer\",le=\"+Inf\"} 2",
            "baton_migration_step_duration_ms_count{step=\"resolve\"} 2",
            "baton_migration_snapshot_bytes_bucket{le=\"2048\"} 1",
            "baton_migration_snapshot_bytes_count 1",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }
}
