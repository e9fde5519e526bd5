//! What a shard's log carries. Commands are validated before they are logged, so
//! applying one never fails for a reason of its content.

use crate::ids::PointId;
use crate::point::PointRecord;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ShardCommand {
    /// Insert or replace each point by id; later entries win within one batch.
    Upsert(Vec<PointRecord>),
    /// Remove these ids; unknown ids are ignored.
    Delete(Vec<PointId>),
}
