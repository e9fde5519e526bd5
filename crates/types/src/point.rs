//! A point as stored: its vector already normalised where the metric needs it, and
//! `expires_at_ms` already resolved against the collection's default retention,
//! so applying it needs no clock.

use crate::ids::{PointId, RegionId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    String(String),
    Integer(i64),
    Double(f64),
    Bool(bool),
}

impl Value {
    /// Integers and doubles compare numerically in filters.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Integer(i) => Some(*i as f64),
            Value::Double(d) => Some(*d),
            _ => None,
        }
    }
}

/// BTreeMap so the encoding (and so the state digest) is independent of insertion order.
pub type Payload = BTreeMap<String, Value>;

/// GDPR Art. 6(1) lawful bases; `Unspecified` means none was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LawfulBasis {
    Unspecified,
    Consent,
    Contract,
    LegalObligation,
    VitalInterests,
    PublicTask,
    LegitimateInterests,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointRecord {
    pub id: PointId,
    pub region: RegionId,
    pub vector: Vec<f32>,
    pub subject: String,
    pub payload: Payload,
    pub lawful_basis: LawfulBasis,
    pub source: String,
    /// Unix milliseconds; 0 = never expires.
    pub expires_at_ms: u64,
    /// When the subject gave the consent this point's `Consent` basis rests on
    /// (Unix milliseconds; 0 = not stated). Only consent given after an
    /// erasure lets an erased subject's data back in.
    pub consent_at_ms: u64,
}

impl PointRecord {
    pub fn is_expired(&self, now_ms: u64) -> bool {
        expired(self.expires_at_ms, now_ms)
    }
}

/// The one definition of "expired", shared by the store, the index and reads.
pub fn expired(expires_at_ms: u64, now_ms: u64) -> bool {
    expires_at_ms != 0 && expires_at_ms <= now_ms && !crate::chaos::broken(crate::chaos::Switch::ServeExpired)
}
