//! API keys as meta records them: an id, the SHA-256 of the secret (never the
//! secret), and scopes. A key is shown whole once, when it is made; a caller
//! presents `sovra_<id>_<secret>` and is known by hashing the secret again.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sovra_types::{CollectionName, RegionId};
use std::collections::BTreeSet;

/// A set of regions a key may read or write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Regions {
    All,
    Only(BTreeSet<RegionId>),
}

impl Regions {
    pub fn contains(&self, r: &RegionId) -> bool {
        match self {
            Regions::All => true,
            Regions::Only(s) => s.contains(r),
        }
    }

    pub fn none() -> Self {
        Regions::Only(BTreeSet::new())
    }
}

/// What a key may do (R3: which regions it may read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scopes {
    /// Regions whose points it may search, get and scroll.
    pub read: Regions,
    /// Regions whose points it may upsert and delete.
    pub write: Regions,
    /// Collections it may use; `None`: every collection.
    pub collections: Option<BTreeSet<CollectionName>>,
    /// Collections, keys and region policies.
    pub admin: bool,
    /// Erasure, opt-out and subject access.
    pub data_protection: bool,
}

impl Scopes {
    /// Everything: the first admin key's scopes, and a node with `auth = false`.
    pub fn all() -> Self {
        Self {
            read: Regions::All,
            write: Regions::All,
            collections: None,
            admin: true,
            data_protection: true,
        }
    }

    pub fn may_use(&self, c: &CollectionName) -> bool {
        self.collections.as_ref().is_none_or(|s| s.contains(c))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub sha256: [u8; 32],
    pub scopes: Scopes,
    /// The maker's clock, Unix milliseconds.
    pub created_ms: u64,
}

/// The most requests per second, and the largest burst, a key's rate may name.
pub const MAX_RATE: u32 = 1_000_000;

/// How fast a key may call: a token bucket on every coordinator node, filled
/// at `per_second` up to `burst` (each public call takes one token). A key
/// without one is limited only by the node's budget. Recorded from meta
/// level 2 ([`crate::state::MetaExt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRate {
    pub per_second: u32,
    pub burst: u32,
}

impl KeyRate {
    /// Why this rate cannot be recorded, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.per_second == 0 || self.per_second > MAX_RATE {
            return Err(format!(
                "per_second is {}; it must be 1 to {MAX_RATE} (leave the rate out for no limit)",
                self.per_second
            ));
        }
        if self.burst == 0 || self.burst > MAX_RATE {
            return Err(format!("burst is {}; it must be 1 to {MAX_RATE}", self.burst));
        }
        Ok(())
    }
}

pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The presented form of a key.
pub fn format_key(id: &str, secret: &str) -> String {
    format!("sovra_{id}_{secret}")
}

/// Splits a presented key into its id and secret.
pub fn parse_key(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix("sovra_")?.split_once('_')
}

/// A key id: lowercase letters, digits and '-', 1..=32 chars, starting with a
/// letter (no '_': it separates the id from the secret).
pub fn valid_key_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

impl ApiKeyRecord {
    /// Whether `secret` is this key's (constant time over the digest).
    pub fn matches(&self, secret: &str) -> bool {
        let h = hash_secret(secret);
        h.iter().zip(self.sha256.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_known_by_their_hash_only() {
        let rec = ApiKeyRecord {
            id: "admin1".into(),
            sha256: hash_secret("s3cret"),
            scopes: Scopes::all(),
            created_ms: 1,
        };
        let key = format_key(&rec.id, "s3cret");
        let (id, secret) = parse_key(&key).unwrap();
        assert_eq!(id, "admin1");
        assert!(rec.matches(secret));
        assert!(!rec.matches("s3cre"));
        assert!(parse_key("bearer xyz").is_none());
        assert!(valid_key_id("uk-reader-2"));
        assert!(!valid_key_id("uk_reader") && !valid_key_id("") && !valid_key_id("1x") && !valid_key_id(&"a".repeat(33)));
    }

    #[test]
    fn scopes_name_regions_and_collections() {
        let uk = RegionId::parse("uk").unwrap();
        let us = RegionId::parse("us").unwrap();
        let s = Scopes {
            read: Regions::Only([uk.clone()].into()),
            write: Regions::none(),
            collections: Some([CollectionName::parse("people").unwrap()].into()),
            admin: false,
            data_protection: false,
        };
        assert!(s.read.contains(&uk) && !s.read.contains(&us) && !s.write.contains(&uk));
        assert!(s.may_use(&CollectionName::parse("people").unwrap()));
        assert!(!s.may_use(&CollectionName::parse("other").unwrap()));
        assert!(Scopes::all().may_use(&CollectionName::parse("other").unwrap()));
    }
}
