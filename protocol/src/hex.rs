//! Hex, the text form of every binary value in these messages (CIDs, connection keys, tokens).
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The one hex of the tree (`lb_common`'s): lower-case out; in, either case, optionally
/// `0x`-prefixed, blanks around ignored, `None` unless an even number of hex digits.
pub use lb_common::{hex as encode, unhex as decode};

/// Bytes that travel as a hex string (a migration token).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct HexBytes(pub Vec<u8>);

impl std::fmt::Debug for HexBytes {
    /// Only the length: these may be credentials (tokens), which never go to a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HexBytes({} bytes)", self.0.len())
    }
}

impl Serialize for HexBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for HexBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        decode(&s)
            .map(HexBytes)
            .ok_or_else(|| serde::de::Error::custom("not hex (an even number of hex digits)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        assert_eq!(encode(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(decode("00ab10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(decode(" 0x00AB "), Some(vec![0, 0xab]));
        assert_eq!(decode(""), Some(vec![]));
        assert_eq!(decode("abc"), None);
        assert_eq!(decode("zz"), None);
        assert_eq!(decode("é0"), None);
    }
}
