//! One replica's part of a read: checks, then answers from the local engine.
//!
//! Before anything is read, a leaf refuses a shard of another region (R2:
//! `RaftHost::check_residency`, counted) and a coordinator region the shard
//! region's policy does not let results go to (R3, counted), whatever the root
//! decided. Then it waits for the read level asked (a linearizable read
//! confirms a read index with the leader) and answers, bounded in bytes like
//! a public answer.

use crate::NodeContext;
use crate::plan::results_may_go;
use crate::pool::SearchPool;
use crate::wire::{self, Answer, GetQuery, LeafHit, Query, RecordsAnswer, ScrollQuery, SearchAnswer, SearchQuery};
use sovra_proto::raft as pb;
use sovra_proto::status_of;
use sovra_raft::{Group, RaftHost, ReadLevel};
use sovra_shard::SearchParams;
use sovra_types::limits::MAX_ANSWER_BYTES;
use sovra_types::{CollectionName, RegionId, ShardId};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tonic::{Request, Response, Status};

/// A leaf's answer bound: twice the public one, since the root checks the
/// merged answer's exact size against the public bound (and says how many
/// fitted); this one only keeps a leaf's message bounded (the estimate
/// errs large).
pub const LEAF_MAX_BYTES: usize = 2 * MAX_ANSWER_BYTES;

/// Metric names of the leaf side (labels: node, and the shard's region).
pub const LEAF_REQUESTS: &str = "sovra_leaf_requests_total";
pub const LEAF_REFUSED_POLICY: &str = "sovra_leaf_refused_policy_total";

/// Counters of one node's leaf (also on `/metrics`): what tests assert on.
#[derive(Default)]
pub struct LeafStats {
    /// Leaf requests answered, any kind.
    pub served: AtomicU64,
    /// Refused because the shard region's policy keeps results in it (R3).
    pub refused_policy: AtomicU64,
}

/// One shard's part of a read, as the root asks for it.
#[derive(Debug, Clone)]
pub struct LeafCall {
    pub shard: ShardId,
    /// Region of the coordinator the answer goes to.
    pub coordinator_region: RegionId,
    pub map_version: u64,
    pub level: ReadLevel,
}

pub struct Leaf {
    pub host: Arc<RaftHost>,
    ctx: Arc<dyn NodeContext>,
    pool: SearchPool,
    pub stats: LeafStats,
}

/// The leaf's answer and what the root learns besides.
pub struct LeafAnswer {
    pub answer: Answer,
    /// The group's leader as this replica knows it (0: none).
    pub leader: u64,
    pub map_version: u64,
    pub took_us: u64,
}

fn too_large(what: &str, fitted: usize, asked: usize) -> Status {
    Status::resource_exhausted(format!(
        "a shard's part of the answer would pass {LEAF_MAX_BYTES} bytes: only {fitted} of the {asked} {what} fitted; ask for at most {}, or leave out with_payload / with_vector",
        fitted.max(1)
    ))
}

impl Leaf {
    pub fn new(host: Arc<RaftHost>, ctx: Arc<dyn NodeContext>, pool: SearchPool) -> Self {
        Self {
            host,
            ctx,
            pool,
            stats: LeafStats::default(),
        }
    }

    fn admit(&self, call: &LeafCall, rpc: &'static str) -> Result<Arc<Group>, Status> {
        self.host.check_residency(&call.shard, rpc)?;
        let view = self.ctx.view();
        let region = &call.shard.region;
        if !results_may_go(&view.state.policies, region, &call.coordinator_region) {
            self.stats.refused_policy.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(LEAF_REFUSED_POLICY, "node" => self.host.me.to_string(), "region" => region.to_string()).increment(1);
            return Err(Status::permission_denied(format!(
                "R3: region {region}'s policy keeps its search results in {region}; a coordinator in {} may not have them",
                call.coordinator_region
            )));
        }
        if let Some(why) = self.ctx.failure(&call.shard) {
            return Err(Status::unavailable(format!(
                "the replica of shard {} on node {} failed to open ({why})",
                call.shard, self.host.me
            )));
        }
        self.host.group(&call.shard).ok_or_else(|| {
            Status::not_found(format!(
                "node {} holds no replica of shard {} (its shard map is version {}, the coordinator's {})",
                self.host.me, call.shard, view.state.map_version, call.map_version
            ))
        })
    }

    /// Answers `query` for `call` from this node's replica.
    pub async fn answer(&self, call: &LeafCall, query: Query) -> Result<LeafAnswer, Status> {
        let start = Instant::now();
        let rpc = match &query {
            Query::Search(_) => "shard_search",
            Query::Get(_) => "shard_get",
            Query::Scroll(_) => "shard_scroll",
        };
        let group = self.admit(call, rpc)?;
        self.host.read_barrier(&call.shard, call.level).await.map_err(|e| status_of(&e))?;
        let engine = group.engine().clone();
        if engine.retired() {
            // Its split's halves hold everything it held, and may already
            // have taken writes: the root reads them instead.
            return Err(Status::not_found(format!(
                "shard {} was split (job {}): its halves hold its points; the coordinator's shard map (version {}) is older than the split's",
                call.shard,
                engine.split_fence().unwrap_or_default(),
                call.map_version
            )));
        }
        let ctx = self.ctx.clone();
        let answer = self
            .pool
            .run(move || match query {
                Query::Search(q) => search(&engine, q, &*ctx).map(Answer::Search),
                Query::Get(q) => get(&engine, q, &*ctx).map(Answer::Records),
                Query::Scroll(q) => scroll(&engine, q, &*ctx).map(Answer::Records),
            })
            .await??;
        self.stats.served.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(LEAF_REQUESTS, "node" => self.host.me.to_string(), "region" => call.shard.region.to_string(), "rpc" => rpc)
            .increment(1);
        Ok(LeafAnswer {
            answer,
            leader: group.leader().unwrap_or(0),
            map_version: self.ctx.view().state.map_version,
            took_us: start.elapsed().as_micros() as u64,
        })
    }
}

fn search(engine: &sovra_shard::ShardEngine, q: SearchQuery, ctx: &dyn NodeContext) -> Result<SearchAnswer, Status> {
    let params = SearchParams {
        vector: &q.vector,
        k: q.k as usize,
        ef: q.ef as usize,
        filter: q.filter.as_ref(),
        now_ms: q.now_ms,
    };
    let (hits, path) = engine.search_with(&params, q.exact);
    let path = match path {
        sovra_shard::live::SearchPath::Graph => "graph",
        sovra_shard::live::SearchPath::ExactFiltered => "exact_filtered",
        sovra_shard::live::SearchPath::ExactFallback => "exact_fallback",
        sovra_shard::live::SearchPath::Exact => "exact",
    };
    metrics::counter!("sovra_search_path_total", "path" => path).increment(1);
    let asked = hits.len();
    let mut out = Vec::with_capacity(hits.len());
    let mut used = 0usize;
    for h in hits {
        let record = if q.with_payload || q.with_vector {
            // Re-read under the same clock: a point deleted or expired since
            // the index answered is dropped, never returned.
            match engine.get(&h.id, q.now_ms).map_err(|e| ctx.storage_failed(e))? {
                Some(r) => Some(wire::trim(r, q.with_vector, q.with_payload)),
                None => continue,
            }
        } else {
            None
        };
        used += 32 + record.as_ref().map_or(0, wire::record_bytes);
        if used > LEAF_MAX_BYTES {
            return Err(too_large("hits", out.len(), asked));
        }
        out.push(LeafHit {
            id: h.id,
            distance: h.distance,
            record,
        });
    }
    Ok(SearchAnswer { hits: out })
}

fn get(engine: &sovra_shard::ShardEngine, q: GetQuery, ctx: &dyn NodeContext) -> Result<RecordsAnswer, Status> {
    let mut records = Vec::new();
    let mut used = 0usize;
    for id in &q.ids {
        if let Some(r) = engine.get(id, q.now_ms).map_err(|e| ctx.storage_failed(e))? {
            let r = wire::trim(r, q.with_vector, q.with_payload);
            used += wire::record_bytes(&r);
            if used > LEAF_MAX_BYTES {
                return Err(too_large("points", records.len(), q.ids.len()));
            }
            records.push(r);
        }
    }
    Ok(RecordsAnswer { records, done: true })
}

fn scroll(engine: &sovra_shard::ShardEngine, q: ScrollQuery, ctx: &dyn NodeContext) -> Result<RecordsAnswer, Status> {
    let (found, mut done) = match &q.subject {
        Some(s) => engine.scroll_subject(s, q.after.as_ref(), q.limit as usize, q.now_ms),
        None => engine.scroll(q.after.as_ref(), q.limit as usize, q.filter.as_ref(), q.now_ms),
    }
    .map_err(|e| ctx.storage_failed(e))?;
    // A page ends early rather than pass the answer bound: the cursor resumes
    // after the last point sent.
    let mut records = Vec::with_capacity(found.len());
    let mut used = 0usize;
    for r in found {
        let r = wire::trim(r, q.with_vector, q.with_payload);
        used += wire::record_bytes(&r);
        if used > LEAF_MAX_BYTES {
            if records.is_empty() {
                return Err(too_large("points", 0, 1));
            }
            done = false;
            break;
        }
        records.push(r);
    }
    Ok(RecordsAnswer { records, done })
}

/// `sovra.raft.v1.Leaf` on the cluster listener (behind the cluster secret).
pub struct LeafService {
    pub leaf: Arc<Leaf>,
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, Status> {
    postcard::from_bytes(b).map_err(|e| Status::invalid_argument(format!("leaf query does not decode: {e}")))
}

/// The call a `LeafRequest` describes.
pub fn call_of(r: &pb::LeafRequest) -> Result<LeafCall, Status> {
    let g = r.shard.as_ref().ok_or_else(|| Status::invalid_argument("shard is required"))?;
    let shard = ShardId {
        collection: CollectionName::parse(&g.collection).map_err(|e| Status::invalid_argument(e.message))?,
        region: RegionId::parse(&g.region).map_err(|e| Status::invalid_argument(e.message))?,
        number: g.shard,
    };
    let coordinator_region = RegionId::parse(&r.coordinator_region).map_err(|e| Status::invalid_argument(e.message))?;
    let level = if r.linearizable {
        ReadLevel::Linearizable
    } else {
        ReadLevel::Any { min_index: r.min_index }
    };
    Ok(LeafCall {
        shard,
        coordinator_region,
        map_version: r.map_version,
        level,
    })
}

impl LeafService {
    async fn serve(&self, req: Request<pb::LeafRequest>, want: &'static str) -> Result<Response<pb::LeafReply>, Status> {
        let r = req.into_inner();
        let call = call_of(&r)?;
        let query: Query = decode(&r.query)?;
        if query.kind() != want {
            return Err(Status::invalid_argument(format!("a {} query sent to Shard{want}", query.kind())));
        }
        let a = self.leaf.answer(&call, query).await?;
        Ok(Response::new(pb::LeafReply {
            answer: postcard::to_allocvec(&a.answer).map_err(|e| Status::internal(e.to_string()))?,
            map_version: a.map_version,
            leader: a.leader,
            took_us: a.took_us,
        }))
    }
}

#[tonic::async_trait]
impl pb::leaf_server::Leaf for LeafService {
    async fn shard_search(&self, req: Request<pb::LeafRequest>) -> Result<Response<pb::LeafReply>, Status> {
        self.serve(req, "search").await
    }

    async fn shard_get(&self, req: Request<pb::LeafRequest>) -> Result<Response<pb::LeafReply>, Status> {
        self.serve(req, "get").await
    }

    async fn shard_scroll(&self, req: Request<pb::LeafRequest>) -> Result<Response<pb::LeafReply>, Status> {
        self.serve(req, "scroll").await
    }
}
