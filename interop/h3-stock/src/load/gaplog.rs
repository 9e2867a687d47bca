//! `--gap-log`: one line per successful request, `<connection index> <unix time in microseconds>`
//! (wall clock, so it lines up with timestamps other processes on the host take, e.g. a
//! benchmark's migration windows). The same format as baton-load's `--gap-log`, so one parser
//! reads both. Buffered; flushed every [`FLUSH_EVERY`] and at the end.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the run flushes the log.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

pub struct GapLog {
    out: Mutex<BufWriter<Box<dyn Write + Send>>>,
}

impl std::fmt::Debug for GapLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GapLog")
    }
}

impl GapLog {
    /// Creates (truncates) the file at `path`.
    pub fn create(path: &Path) -> std::io::Result<GapLog> {
        Ok(GapLog::to(Box::new(std::fs::File::create(path)?)))
    }

    pub(crate) fn to(w: Box<dyn Write + Send>) -> GapLog {
        GapLog {
            out: Mutex::new(BufWriter::new(w)),
        }
    }

    /// A request on connection `conn` completed now.
    pub fn completed(&self, conn: usize) {
        let us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.line(conn, us);
    }

    pub(crate) fn line(&self, conn: usize, unix_us: u64) {
        // A write error shows at the next flush (the periodic one or the last).
        let _ = writeln!(self.out.lock().unwrap(), "{conn} {unix_us}");
    }

    pub fn flush(&self) -> std::io::Result<()> {
        self.out.lock().unwrap().flush()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    pub(crate) struct Shared(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_line_per_completion_in_baton_loads_format_after_a_flush() {
        let bytes = Shared::default();
        let log = GapLog::to(Box::new(bytes.clone()));
        log.line(0, 1_700_000_000_000_001);
        log.line(3, 1_700_000_000_000_250);
        // Buffered: nothing reaches the file before a flush.
        assert!(bytes.0.lock().unwrap().is_empty());
        log.flush().unwrap();
        let text = String::from_utf8(bytes.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "0 1700000000000001\n3 1700000000000250\n");

        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        log.completed(1);
        log.flush().unwrap();
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let text = String::from_utf8(bytes.0.lock().unwrap().clone()).unwrap();
        let last = text.lines().last().unwrap();
        let (conn, us) = last.split_once(' ').unwrap();
        let us: u128 = us.parse().unwrap();
        assert_eq!(conn, "1");
        assert!(
            before.as_micros() <= us && us <= after.as_micros(),
            "{last}"
        );
    }
}
