use super::{AnswerBudget, ReadLevels, audited, now_ms, parse_filter};
use crate::audit::Note;
use crate::auth::Caller;
use crate::state::NodeState;
use sovra_coord::plan::regions_to_ask;
use sovra_coord::wire::SearchQuery;
use sovra_proto::convert::{point_id_to, point_to};
use sovra_proto::v1::{self, search_server::Search};
use sovra_types::limits::{MAX_EF_SEARCH, MAX_K};
use sovra_types::validate::{check_region, prepare_vector};
use sovra_types::{ApiError, RegionId};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct SearchService {
    pub state: Arc<NodeState>,
}

#[tonic::async_trait]
impl Search for SearchService {
    async fn search(&self, req: Request<v1::SearchRequest>) -> Result<Response<v1::SearchResponse>, Status> {
        let start = std::time::Instant::now();
        let note = Note::new("search", req.metadata());
        audited(&self.state, "search", &note, async {
            let caller = self.state.authenticate(req.metadata()).await?;
            note.caller(&caller)?;
            let mut answer = self.run(caller, &note, req.into_inner()).await?;
            answer.took_us = start.elapsed().as_micros() as u64;
            Ok(answer)
        })
        .await
    }
}

impl SearchService {
    /// Validates, picks the regions (R3), and hands the fan-out to the
    /// coordinator (`sovra_coord::Root`); then bounds and converts the answer.
    async fn run(&self, caller: Caller, note: &Note, req: v1::SearchRequest) -> Result<v1::SearchResponse, ApiError> {
        let c = self.state.collection_now(&req.collection).await?;
        caller.require_collection(&c.spec.name)?;
        note.collection(&c.spec)?;
        if req.k == 0 || req.k > MAX_K {
            return Err(ApiError::invalid(format!("k is {}: it must be between 1 and {MAX_K}", req.k)));
        }
        let ef = match req.ef {
            Some(0) => return Err(ApiError::invalid("ef is 0: omit it for the collection default, or give 1 to 4096")),
            Some(ef) if ef > MAX_EF_SEARCH => return Err(ApiError::invalid(format!("ef is {ef}: at most {MAX_EF_SEARCH}"))),
            Some(ef) => ef,
            None => c.spec.hnsw.ef_search,
        }
        .max(req.k);
        let levels = ReadLevels::parse(req.consistency, &req.after)?;
        let vector = prepare_vector(&c.spec, req.vector, "vector")?;
        note.query(&vector);
        let filter = parse_filter(req.filter.as_ref())?;
        let mut requested: Vec<RegionId> = Vec::with_capacity(req.regions.len());
        for (i, r) in req.regions.iter().enumerate() {
            let region = check_region(&c.spec, r).map_err(|e| e.at(&format!("regions[{i}]")))?;
            // A region named twice is searched once (documented in the proto).
            if !requested.contains(&region) {
                requested.push(region);
            }
        }
        let spanned: Vec<RegionId> = c.spec.regions.iter().map(|r| r.region.clone()).collect();
        let view = self.state.view();
        let (ask, excluded) = regions_to_ask(&spanned, &requested, &caller.scopes.read, &view.state.policies, &self.state.region)
            .map_err(|e| caller.count_denial(e))?;
        note.regions(&ask);

        let k = req.k as usize;
        let query = SearchQuery {
            vector,
            k: req.k,
            ef,
            filter,
            with_vector: req.with_vector,
            with_payload: req.with_payload,
            exact: req.exact,
            now_ms: now_ms(),
        };
        let result = self.state.root().search(&c.spec.name, &ask, query, |s| levels.for_shard(s)).await?;
        note.shards(result.shards.len());
        let statuses: Vec<v1::ShardStatus> = result
            .shards
            .iter()
            .map(|r| v1::ShardStatus {
                region: r.shard.region.to_string(),
                shard: r.shard.number,
                answered: r.error.is_none(),
                error: r.error.clone().unwrap_or_default(),
                node: r.node,
                hedged: r.hedged,
                leaf_us: r.leaf_us,
            })
            .collect();
        // A refusal every replica would repeat is the answer, partial or not.
        if let Some(r) = result.shards.iter().find(|r| {
            matches!(
                r.code,
                tonic::Code::ResourceExhausted | tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
            )
        }) {
            return Err(sovra_coord::root::shard_failed(&r.shard, r.code, r.error.as_deref().unwrap_or("")));
        }
        let partial = statuses.iter().any(|s| !s.answered);
        if partial && !req.allow_partial {
            let missing: Vec<String> = result
                .shards
                .iter()
                .filter_map(|r| r.error.as_ref().map(|e| format!("{} ({e})", r.shard)))
                .collect();
            return Err(ApiError::unavailable(format!(
                "shards {} did not answer; retry, or set allow_partial to accept results without them",
                missing.join(", ")
            )));
        }
        let mut budget = AnswerBudget::new();
        for s in &statuses {
            budget.add(s);
        }
        let excluded: Vec<v1::ExcludedRegion> = excluded
            .into_iter()
            .map(|e| v1::ExcludedRegion {
                region: e.region.to_string(),
                reason: e.reason,
            })
            .collect();
        for e in &excluded {
            budget.add(e);
        }
        let mut hits = Vec::with_capacity(result.hits.len());
        for (region, hit) in result.hits {
            let point = match &hit.record {
                Some(r) => point_to(r, req.with_vector, req.with_payload),
                None => v1::Point {
                    id: Some(point_id_to(&hit.id)),
                    region: region.to_string(),
                    ..Default::default()
                },
            };
            let scored = v1::ScoredPoint {
                point: Some(point),
                distance: hit.distance,
            };
            if !budget.add(&scored) {
                return Err(AnswerBudget::exceeded(
                    "hits",
                    hits.len(),
                    k,
                    &format!(
                        "lower k to at most {}, or set with_payload / with_vector to false",
                        hits.len().max(1)
                    ),
                ));
            }
            hits.push(scored);
        }
        note.results(hits.len() as u64);
        Ok(v1::SearchResponse {
            hits,
            shards: statuses,
            partial,
            excluded,
            took_us: 0,
        })
    }
}
