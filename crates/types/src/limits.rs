//! Documented limits. They are chosen so that any accepted request fits the gRPC
//! message limit and no accepted value can reach an assertion inside hnsw_rs.

/// gRPC message limit the node accepts (and sends). Batches are bounded below it.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Largest answer a node builds (Get, Search): 4 MiB, the default receive limit
/// of gRPC clients in every language, so any client can read any answer. The
/// bytes are counted while the answer is assembled; past this the request fails
/// RESOURCE_EXHAUSTED saying how many results fitted.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;
pub const MAX_DIMENSION: u32 = 4096;
/// hnsw_rs calls `process::exit` above 256 links; layer 0 holds 2*m, so m <= 128.
pub const MIN_M: u32 = 4;
pub const MAX_M: u32 = 128;
pub const MIN_EF_CONSTRUCTION: u32 = 16;
pub const MAX_EF_CONSTRUCTION: u32 = 2048;
pub const MAX_EF_SEARCH: u32 = 4096;
pub const MAX_K: u32 = 1000;
pub const MAX_SHARDS_PER_REGION: u32 = 256;
pub const MAX_REGIONS: usize = 32;
pub const MAX_REPLICATION_FACTOR: u32 = 7;
pub const MAX_BATCH_POINTS: usize = 1000;
/// Vectors (4 bytes a component) plus encoded payloads of one batch.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
pub const MAX_PAYLOAD_FIELDS: usize = 64;
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
pub const MAX_KEY_BYTES: usize = 128;
pub const MAX_SUBJECT_BYTES: usize = 256;
pub const MAX_SOURCE_BYTES: usize = 1024;
pub const MAX_IDS_PER_REQUEST: usize = 10_000;
pub const MAX_FILTER_DEPTH: usize = 8;
pub const MAX_FILTER_CONDITIONS: usize = 64;
/// Components beyond this magnitude could overflow f32 sums of squares at 4096 dims.
pub const MAX_COMPONENT_ABS: f32 = 1e15;
/// Under the dot metric, distance is `1 - dot`, which hnsw_rs requires to be >= 0:
/// vectors must have norm <= 1 (with this slack for rounding).
pub const DOT_MAX_NORM: f32 = 1.0 + 1e-3;
/// Bytes of an erasure job's id.
pub const MAX_JOB_ID_BYTES: usize = 64;
/// How far ahead of a node's clock a stated consent time may be (clock skew).
pub const MAX_CLOCK_AHEAD_MS: u64 = 5 * 60 * 1000;
