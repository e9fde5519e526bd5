//! Sovra's vocabulary: ids as newtypes, collection specs and their limits, points,
//! payload filters, shard commands, hash routing, and the error type every layer
//! returns to clients.
//!
//! Pure: no I/O, no async, no clock, no protobuf. Everything above depends on this
//! crate; it depends on nothing of Sovra's. Validation lives here so that the same
//! rules run wherever a request enters, before anything is logged or written.

pub mod chaos;
pub mod collection;
pub mod command;
pub mod error;
pub mod filter;
pub mod ids;
pub mod limits;
pub mod point;
pub mod routing;
pub mod validate;

pub use collection::{CollectionSpec, HnswParams, Metric, RegionShards};
pub use command::{CopyBatch, Erase, EraseTarget, OptOut, SPLIT_REFUSAL, ShardCommand, Suppression};
pub use error::{ApiError, ErrorCode, quote};
pub use filter::{Condition, Filter, Range};
pub use ids::{CollectionName, PointId, RegionId, ShardId};
pub use point::{LawfulBasis, Payload, PointRecord, Value};
pub use routing::{HashRange, RegionShardMap, point_hash};
