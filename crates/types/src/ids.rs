//! Identifiers as newtypes, each validated once where it is made.

use crate::error::{ApiError, quote};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A collection name: starts with a lowercase letter; then lowercase letters,
/// digits, '_' or '-'; 1..=64 bytes (it becomes part of storage tree names).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CollectionName(String);

impl CollectionName {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.as_bytes()[0].is_ascii_lowercase()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ApiError::invalid(format!(
                "collection name {} is invalid: use 1 to 64 of a-z, 0-9, '_' and '-', starting with a letter",
                quote(s)
            )))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CollectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A region label such as `eu-west`: lowercase letters, digits and '-', 1..=32 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RegionId(String);

impl RegionId {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let ok = !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ApiError::invalid(format!(
                "region {} is invalid: use 1 to 32 of a-z, 0-9 and '-'",
                quote(s)
            )))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A point's id within its region: a u64 or a UUID. Never an index slot number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PointId {
    Num(u64),
    Uuid(uuid::Uuid),
}

impl PointId {
    /// Bytes hashed for routing and used as the storage key: a tag byte (1 for
    /// numbers, 2 for UUIDs) then the big-endian value, so keys sort by kind then value.
    pub fn key_bytes(&self) -> Vec<u8> {
        match self {
            PointId::Num(n) => {
                let mut k = Vec::with_capacity(9);
                k.push(1);
                k.extend_from_slice(&n.to_be_bytes());
                k
            }
            PointId::Uuid(u) => {
                let mut k = Vec::with_capacity(17);
                k.push(2);
                k.extend_from_slice(u.as_bytes());
                k
            }
        }
    }

    /// Inverse of [`PointId::key_bytes`]; `None` for bytes it never produced.
    pub fn from_key_bytes(b: &[u8]) -> Option<Self> {
        match (b.first(), b.len()) {
            (Some(1), 9) => Some(PointId::Num(u64::from_be_bytes(b[1..9].try_into().ok()?))),
            (Some(2), 17) => Some(PointId::Uuid(uuid::Uuid::from_slice(&b[1..17]).ok()?)),
            _ => None,
        }
    }
}

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PointId::Num(n) => write!(f, "{n}"),
            PointId::Uuid(u) => write!(f, "{u}"),
        }
    }
}

/// One shard: `(collection, region, number)`. Each is its own engine and storage.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId {
    pub collection: CollectionName,
    pub region: RegionId,
    pub number: u32,
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.collection, self.region, self.number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_regions_are_checked() {
        assert!(CollectionName::parse("faces_v2").is_ok());
        for bad in ["", "Faces", "1abc", "a b", &"a".repeat(65)] {
            assert!(CollectionName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(RegionId::parse("eu-west").is_ok());
        for bad in ["", "EU", "eu_west", &"a".repeat(33)] {
            assert!(RegionId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_bytes_round_trip_and_sort_numbers_in_order() {
        let ids = [
            PointId::Num(0),
            PointId::Num(7),
            PointId::Num(u64::MAX),
            PointId::Uuid(uuid::Uuid::from_u128(5)),
        ];
        for id in ids {
            assert_eq!(PointId::from_key_bytes(&id.key_bytes()), Some(id));
        }
        assert!(PointId::Num(7).key_bytes() < PointId::Num(256).key_bytes());
        assert_eq!(PointId::from_key_bytes(&[1, 2, 3]), None);
    }
}
