//! API keys as meta records them: an id, the SHA-256 of the secret (never the
//! secret), and scopes. A key is shown whole once, when it is made; a caller
//! presents `sovra_<id>_<secret>` and is known by hashing the secret again.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a key may do. Query scope per region (R3) comes with the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    /// Everything, including making and revoking keys.
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub sha256: [u8; 32],
    pub scopes: Vec<Scope>,
    /// The maker's clock, Unix milliseconds.
    pub created_ms: u64,
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
            scopes: vec![Scope::Admin],
            created_ms: 1,
        };
        let key = format_key(&rec.id, "s3cret");
        let (id, secret) = parse_key(&key).unwrap();
        assert_eq!(id, "admin1");
        assert!(rec.matches(secret));
        assert!(!rec.matches("s3cre"));
        assert!(parse_key("bearer xyz").is_none());
    }
}
