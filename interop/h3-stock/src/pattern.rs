//! The deterministic body pattern shared by every HTTP/3 test part (docs: the shared spec).
//!
//! Byte `i` (0-based) of a body with seed `s` is `((i * 2654435761 + s * 40503) >> 16) & 0xFF`,
//! computed in u64 for `i < 2^32` and `s < 2^24` (so it never overflows).

/// Seeds are below 2^24.
pub const SEED_LIMIT: u64 = 1 << 24;

/// Byte `i` of the body with seed `seed`.
#[inline]
pub fn byte(i: u64, seed: u64) -> u8 {
    ((i * 2_654_435_761 + seed * 40_503) >> 16) as u8
}

/// `len` bytes of the pattern with `seed`, starting at byte 0.
pub fn body(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64).map(|i| byte(i, seed)).collect()
}

/// Index (within `chunk`) of the first byte that differs from the pattern, `chunk` being the
/// bytes from `offset` on.
pub fn first_mismatch(chunk: &[u8], offset: u64, seed: u64) -> Option<usize> {
    chunk
        .iter()
        .enumerate()
        .position(|(j, &b)| b != byte(offset + j as u64, seed))
}

/// Checks a body as it arrives, chunk by chunk, against `expected_len` bytes of the pattern.
#[derive(Debug)]
pub struct Verifier {
    seed: u64,
    expected_len: u64,
    received: u64,
}

impl Verifier {
    pub fn new(expected_len: u64, seed: u64) -> Self {
        Self {
            seed,
            expected_len,
            received: 0,
        }
    }

    /// Bytes seen so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Checks the next chunk. An error names the first wrong byte or the overrun.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), String> {
        let offset = self.received;
        self.received += chunk.len() as u64;
        if self.received > self.expected_len {
            return Err(format!(
                "body longer than {} bytes (at least {})",
                self.expected_len, self.received
            ));
        }
        match first_mismatch(chunk, offset, self.seed) {
            None => Ok(()),
            Some(j) => {
                let at = offset + j as u64;
                Err(format!(
                    "body differs at byte {at}: got {:#04x}, want {:#04x}",
                    chunk[j],
                    byte(at, self.seed)
                ))
            }
        }
    }

    /// Checks the body ended at the expected length.
    pub fn finish(&self) -> Result<(), String> {
        if self.received == self.expected_len {
            Ok(())
        } else {
            Err(format!(
                "body ended after {} of {} bytes",
                self.received, self.expected_len
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Computed independently (Python, arbitrary precision) from the formula.
        assert_eq!(byte(0, 0), 0);
        assert_eq!(byte(1, 0), 55);
        assert_eq!(byte(0, 1000), 106);
        assert_eq!(byte(12_345, 678), 206);
        assert_eq!(byte((1 << 32) - 1, SEED_LIMIT - 1), 199);
    }

    #[test]
    fn verifier_accepts_the_pattern_in_any_chunks() {
        let b = body(10_000, 77);
        let mut v = Verifier::new(10_000, 77);
        for c in b.chunks(333) {
            v.feed(c).unwrap();
        }
        v.finish().unwrap();
    }

    #[test]
    fn verifier_rejects_wrong_short_and_long_bodies() {
        let mut b = body(1000, 5);
        b[600] ^= 1;
        let mut v = Verifier::new(1000, 5);
        v.feed(&b[..500]).unwrap();
        let e = v.feed(&b[500..]).unwrap_err();
        assert!(e.contains("byte 600"), "{e}");

        let mut v = Verifier::new(1000, 5);
        v.feed(&body(999, 5)).unwrap();
        assert!(v.finish().is_err());

        let mut v = Verifier::new(1000, 5);
        assert!(v.feed(&body(1001, 5)).is_err());

        // Another seed is another body.
        let mut v = Verifier::new(1000, 6);
        assert!(v.feed(&body(1000, 5)).is_err());
    }
}
