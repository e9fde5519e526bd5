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
    /// Takes an opt-out template off the shard's registry (later writes
    /// within its threshold are taken again). Erases nothing.
    RemoveOptOut { template: String },
    /// A shard split's fence: from here on the shard refuses upserts, deletes
    /// and opt-out removals (refused at apply, reason containing
    /// [`SPLIT_REFUSAL`]), so the state the split copies to the shard's halves
    /// is final. Erasures still apply (an erasure cancels a split in meta
    /// before it reaches a shard). Node-internal: never built from a request.
    Freeze { job: String },
    /// Lifts the fence of split `job`, and its retirement (the split was
    /// cancelled).
    Unfreeze { job: String },
    /// The split's halves hold the fenced shard's final state: from here on
    /// the shard answers no reads either (a reader with an older shard map is
    /// told to refresh it and reads the halves). Applied before the shard map
    /// switches, so no reader sees this shard once a half took a write.
    Retire { job: String },
    /// Part of a split parent's state copied into one of its halves: points
    /// set, ids removed, suppression entries and opt-out templates adopted.
    /// Applied without the suppression and opt-out checks: it copies state the
    /// parent already accepted. Node-internal: never built from a request.
    Copy(Box<CopyBatch>),
}

/// What a refused write's reason contains when its shard is being split:
/// the writer waits for the split's new shard map and sends it again.
pub const SPLIT_REFUSAL: &str = "is being split";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CopyBatch {
    /// The split job copying.
    pub job: String,
    /// Read from the parent after its fence. The first such copy seals the
    /// half: a copy read before the fence that arrives later (from a driver
    /// that lost the parent's leadership meanwhile) is refused, so it cannot
    /// overwrite the final state with an older one.
    pub fenced: bool,
    pub points: Vec<PointRecord>,
    pub delete: Vec<PointId>,
    /// The parent's suppression key (the first batch carries it).
    pub suppress_key: Option<[u8; 32]>,
    /// Suppression entries: (keyed hash of the subject, erased at ms).
    pub suppressed: Vec<([u8; 32], u64)>,
    /// Tombstones of erased points: (keyed hash of the id, erased at ms).
    pub tombstones: Vec<([u8; 32], u64)>,
    pub opt_outs: Vec<(String, OptOut)>,
    pub remove_opt_outs: Vec<String>,
}

/// A shard's replicated state beside its points, as snapshots carry it: the
/// suppression list (the hash key and every entry (tag, erased at ms), in tag
/// order), the opt-out registry (templates in id order), and a split's fence.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Suppression {
    pub key: Option<[u8; 32]>,
    pub entries: Vec<([u8; 32], u64)>,
    /// The opt-out registry: (template id, template), in id order.
    pub opt_outs: Vec<(String, OptOut)>,
    /// The split job that froze the shard ([`ShardCommand::Freeze`]), if any.
    pub frozen: Option<String>,
    /// Whether that split retired it ([`ShardCommand::Retire`]).
    pub retired: bool,
    /// A split half: the job whose final copy (after the parent's fence)
    /// began here; copies from before the fence are refused from then on.
    pub sealed: Option<String>,
    /// Tombstones of erased points: (keyed hash of the point id under the
    /// same key as the subjects', erased at ms), in hash order. A restore
    /// drops a backed-up point erased after its backup by them; the ids
    /// themselves are never kept.
    pub tombstones: Vec<([u8; 32], u64)>,
}

/// A registered opt-out: a likeness (a vector, prepared like a point's) and
/// the distance within which a point counts as that person. Lives only in the
/// region's shard groups (and their snapshots): never leaves the region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptOut {
    pub vector: Vec<f32>,
    /// In the collection's metric, as search reports distances.
    pub threshold: f32,
    /// When it was registered (the proposer's clock, Unix ms).
    pub at_ms: u64,
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
    /// An opt-out's registration: every point within `threshold` of `vector`
    /// (and, when `subject` is named, that subject's points, the subject
    /// then suppressed) is erased, and the template goes on the shard's
    /// opt-out registry, so later writes within it are refused at apply and
    /// searches never return a point within it.
    Likeness {
        template: String,
        vector: Vec<f32>,
        threshold: f32,
        subject: Option<String>,
    },
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
            EraseTarget::Likeness { .. } => "likeness",
        }
    }
}
