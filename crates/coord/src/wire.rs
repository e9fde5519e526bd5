//! Queries a root sends a leaf, and the answers, as postcard inside
//! `LeafRequest.query` / `LeafReply.answer` (both ends run one build; the
//! node-to-node protocol version says so).

use serde::{Deserialize, Serialize};
use sovra_types::{Filter, PointId, PointRecord};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchQuery {
    pub vector: Vec<f32>,
    pub k: u32,
    pub ef: u32,
    pub filter: Option<Filter>,
    pub with_vector: bool,
    pub with_payload: bool,
    pub exact: bool,
    /// The coordinator's clock: every shard drops points expired at it.
    pub now_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeafHit {
    pub id: PointId,
    pub distance: f32,
    /// The point, when the query asked for its vector or payload.
    pub record: Option<PointRecord>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SearchAnswer {
    pub hits: Vec<LeafHit>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetQuery {
    pub ids: Vec<PointId>,
    pub with_vector: bool,
    pub with_payload: bool,
    pub now_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScrollQuery {
    /// Resume after this id (from the shard's first point without it).
    pub after: Option<PointId>,
    pub limit: u32,
    pub filter: Option<Filter>,
    pub with_vector: bool,
    pub with_payload: bool,
    pub now_ms: u64,
    /// Only this subject's points (subject access), through the shard's
    /// subject index.
    pub subject: Option<String>,
}

/// Points found (get: in the order asked; scroll: in key order).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecordsAnswer {
    pub records: Vec<PointRecord>,
    /// Scroll: the shard has nothing after the last record.
    pub done: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Query {
    Search(SearchQuery),
    Get(GetQuery),
    Scroll(ScrollQuery),
}

impl Query {
    pub fn kind(&self) -> &'static str {
        match self {
            Query::Search(_) => "search",
            Query::Get(_) => "get",
            Query::Scroll(_) => "scroll",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Answer {
    Search(SearchAnswer),
    Records(RecordsAnswer),
}

/// Drops what the caller did not ask for, so it never crosses the wire.
pub fn trim(mut r: PointRecord, with_vector: bool, with_payload: bool) -> PointRecord {
    if !with_vector {
        r.vector = Vec::new();
    }
    if !with_payload {
        r.payload = Default::default();
    }
    r
}

/// An upper estimate of a record's size in a public answer, for bounding a
/// leaf's answer before it is sent (the root checks the exact size again).
pub fn record_bytes(r: &PointRecord) -> usize {
    let payload: usize = r.payload.iter().map(|(k, v)| k.len() + 16 + value_bytes(v)).sum();
    64 + r.vector.len() * 4 + r.subject.len() + r.source.len() + r.region.as_str().len() + payload
}

fn value_bytes(v: &sovra_types::Value) -> usize {
    match v {
        sovra_types::Value::String(s) => s.len(),
        _ => 8,
    }
}
