//! What a shard's log carries. Commands are validated before they are logged, so
//! applying one never fails for a reason of its content.

use crate::filter::Filter;
use crate::ids::PointId;
use crate::point::PointRecord;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ShardCommand {
    /// Insert or replace each point by id; later entries win within one batch.
    Upsert(Vec<PointRecord>),
    /// Remove these ids; unknown ids are ignored.
    Delete(Vec<PointId>),
    /// A data-protection erasure: removes the points it selects and, for an
    /// erased subject, puts the subject on the shard's suppression list (a
    /// keyed hash, never the id itself) so later writes for it are refused
    /// unless consent was given after `at_ms`.
    Erase(Erase),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Erase {
    /// The erasure job this is part of (opaque: no personal data).
    pub job: String,
    pub target: EraseTarget,
    /// When the erasure was ordered (the proposer's clock, Unix milliseconds):
    /// consent given before it does not let an erased subject back in.
    pub at_ms: u64,
    /// Key material for the suppression list's keyed hash, adopted by a shard
    /// that has none yet (the first erasure it applies), so every replica
    /// hashes alike and the key never leaves the region's shard group.
    pub salt: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EraseTarget {
    /// These points (unknown ids are ignored); their subjects are not suppressed.
    Ids(Vec<PointId>),
    /// Every point of this subject; the subject is suppressed.
    Subject(String),
    /// Every point whose payload matches; their subjects are not suppressed.
    Filter(Filter),
    /// Every point of the shard (a whole region of a collection); every
    /// subject erased is suppressed.
    All,
    /// The retention sweeper's: those of these points that are expired at
    /// `now_ms` when the command applies (one rewritten meanwhile with a later
    /// expiry stays). No subject is suppressed.
    Expired { ids: Vec<PointId>, now_ms: u64 },
}

impl EraseTarget {
    /// Whether the subjects of the points it erases go on the suppression list.
    pub fn suppresses(&self) -> bool {
        matches!(self, EraseTarget::Subject(_) | EraseTarget::All)
    }

    /// What kind of erasure, for receipts and logs (never the criteria).
    pub fn kind(&self) -> &'static str {
        match self {
            EraseTarget::Ids(_) => "ids",
            EraseTarget::Subject(_) => "subject",
            EraseTarget::Filter(_) => "filter",
            EraseTarget::All => "region",
            EraseTarget::Expired { .. } => "expiry",
        }
    }
}
