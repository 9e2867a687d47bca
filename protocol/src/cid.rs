//! [`Cid`]: a QUIC connection ID (also a connection's stable key), and [`MigrationId`].
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Longest QUIC connection ID (RFC 9000, section 17.2).
pub const MAX_CID_LEN: usize = 20;

/// A QUIC connection ID of 0 to 20 bytes. Text forms (JSON, logs, the CLI) are lower-case hex;
/// binary forms are the bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cid {
    len: u8,
    bytes: [u8; MAX_CID_LEN],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidError {
    #[error("a QUIC connection ID is at most 20 bytes; this one is {0}")]
    TooLong(usize),
    #[error("{0:?} is not hex (an even number of hex digits)")]
    NotHex(String),
}

impl Cid {
    pub fn new(b: &[u8]) -> Result<Self, CidError> {
        if b.len() > MAX_CID_LEN {
            return Err(CidError::TooLong(b.len()));
        }
        let mut bytes = [0; MAX_CID_LEN];
        bytes[..b.len()].copy_from_slice(b);
        Ok(Self {
            len: b.len() as u8,
            bytes,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl AsRef<[u8]> for Cid {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl TryFrom<&[u8]> for Cid {
    type Error = CidError;
    fn try_from(b: &[u8]) -> Result<Self, CidError> {
        Self::new(b)
    }
}

impl FromStr for Cid {
    type Err = CidError;
    fn from_str(s: &str) -> Result<Self, CidError> {
        let b = crate::hex::decode(s).ok_or_else(|| CidError::NotHex(s.to_string()))?;
        Self::new(&b)
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(self.as_bytes()))
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cid({self})")
    }
}

impl Serialize for Cid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_bytes(self.as_bytes())
        }
    }
}

impl<'de> Deserialize<'de> for Cid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            let b = <Vec<u8>>::deserialize(d)?;
            Cid::new(&b).map_err(serde::de::Error::custom)
        }
    }
}

/// One migration attempt: 16 random bytes, so two controllers never hand out the same one. Hex in
/// text forms; in binary forms the 16 bytes as they are (what the token and the seal bind).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MigrationId(pub [u8; 16]);

impl MigrationId {
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationId({self})")
    }
}

impl FromStr for MigrationId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::hex::decode(s)
            .and_then(|b| b.try_into().ok())
            .map(MigrationId)
            .ok_or_else(|| format!("{s:?} is not a migration ID (32 hex digits)"))
    }
}

impl Serialize for MigrationId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for MigrationId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 16]>::deserialize(d).map(MigrationId)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids_are_hex_in_json_and_refuse_more_than_20_bytes() {
        let c: Cid = "0100aabb".parse().unwrap();
        assert_eq!(c.as_bytes(), [1, 0, 0xaa, 0xbb]);
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"0100aabb\"");
        assert_eq!(serde_json::from_str::<Cid>("\"0100aabb\"").unwrap(), c);
        assert!(matches!(Cid::new(&[0; 21]), Err(CidError::TooLong(21))));
        assert!(serde_json::from_str::<Cid>("\"0g\"").is_err());
        assert!(serde_json::from_str::<Cid>(&format!("\"{}\"", "00".repeat(21))).is_err());
        // Two CIDs that differ only in length are different.
        assert_ne!(Cid::new(&[1]).unwrap(), Cid::new(&[1, 0]).unwrap());
    }

    #[test]
    fn migration_ids_are_32_hex_digits() {
        let m = MigrationId([0xab; 16]);
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, format!("\"{}\"", "ab".repeat(16)));
        assert_eq!(serde_json::from_str::<MigrationId>(&j).unwrap(), m);
        assert!(serde_json::from_str::<MigrationId>("\"abab\"").is_err());
    }
}
