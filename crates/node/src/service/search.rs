use super::{AnswerBudget, ReadLevels, blocking, now_ms, observe};
use crate::metrics as m;
use crate::state::NodeState;
use sovra_proto::convert::{filter_from, point_id_to, point_to};
use sovra_proto::v1::{self, search_server::Search};
use sovra_shard::live::SearchPath;
use sovra_shard::{Hit, SearchParams};
use sovra_types::limits::{MAX_ANSWER_BYTES, MAX_EF_SEARCH, MAX_K};
use sovra_types::validate::{check_region, prepare_vector};
use sovra_types::{ApiError, ErrorCode, RegionId, ShardId};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct SearchService {
    pub state: Arc<NodeState>,
}

#[tonic::async_trait]
impl Search for SearchService {
    async fn search(&self, req: Request<v1::SearchRequest>) -> Result<Response<v1::SearchResponse>, Status> {
        observe("search", self.run(req.into_inner())).await
    }
}

impl SearchService {
    async fn run(&self, req: v1::SearchRequest) -> Result<v1::SearchResponse, ApiError> {
        let c = self.state.collection_now(&req.collection).await?;
        if req.k == 0 || req.k > MAX_K {
            return Err(ApiError::invalid(format!("k is {}: it must be between 1 and {MAX_K}", req.k)));
        }
        let ef = match req.ef {
            Some(0) => return Err(ApiError::invalid("ef is 0: omit it for the collection default, or give 1 to 4096")),
            Some(ef) if ef > MAX_EF_SEARCH => return Err(ApiError::invalid(format!("ef is {ef}: at most {MAX_EF_SEARCH}"))),
            Some(ef) => ef,
            None => c.spec.hnsw.ef_search,
        }
        .max(req.k) as usize;
        let levels = ReadLevels::parse(req.consistency, &req.after)?;
        let vector = Arc::new(prepare_vector(&c.spec, req.vector, "vector")?);
        let filter = match &req.filter {
            Some(f) => {
                let f = filter_from(f, "filter")?;
                f.validate()?;
                Some(Arc::new(f))
            }
            None => None,
        };
        let regions: Vec<RegionId> = if req.regions.is_empty() {
            c.spec.regions.iter().map(|r| r.region.clone()).collect()
        } else {
            let mut regions = Vec::with_capacity(req.regions.len());
            for (i, r) in req.regions.iter().enumerate() {
                let region = check_region(&c.spec, r).map_err(|e| e.at(&format!("regions[{i}]")))?;
                // A region named twice is searched once (documented in the proto).
                if !regions.contains(&region) {
                    regions.push(region);
                }
            }
            regions
        };

        // One task per shard this node holds a replica of, once the replica has
        // reached the read level asked for. Shards of other regions are searched
        // only by their region's nodes (R2), so they are reported unanswered.
        let now = now_ms();
        let k = req.k as usize;
        let mut tasks = Vec::new();
        let mut statuses = Vec::new();
        for region in &regions {
            let count = c.spec.region(region).map_or(0, |r| r.shard_count);
            for number in 0..count {
                let shard = ShardId {
                    collection: c.spec.name.clone(),
                    region: region.clone(),
                    number,
                };
                let unanswered = |error: String| v1::ShardStatus {
                    region: region.to_string(),
                    shard: number,
                    answered: false,
                    error,
                };
                let Ok(engine) = c.local_or_unavailable(&self.state, &shard) else {
                    statuses.push(unanswered(match c.failure(&shard) {
                        Some(why) => format!("the replica on this node failed to open: {why}"),
                        None => format!(
                            "no replica on this node; replicas are on nodes {:?} of region {region}",
                            self.state.replicas(&c.spec, &shard)
                        ),
                    }));
                    continue;
                };
                if let Err(e) = self.state.host.read_barrier(&shard, levels.for_shard(&shard)).await {
                    statuses.push(unanswered(e.message));
                    continue;
                }
                let (engine, vector, filter) = (engine.clone(), vector.clone(), filter.clone());
                tasks.push((
                    region.clone(),
                    number,
                    tokio::task::spawn_blocking(move || {
                        let params = SearchParams {
                            vector: &vector,
                            k,
                            ef,
                            filter: filter.as_deref(),
                            now_ms: now,
                        };
                        let (hits, path) = engine.search(&params);
                        (engine, hits, path)
                    }),
                ));
            }
        }
        let mut merged: Vec<(RegionId, Hit, Arc<sovra_shard::ShardEngine>)> = Vec::new();
        for (region, number, task) in tasks {
            match task.await {
                Ok((engine, hits, path)) => {
                    let path = match path {
                        SearchPath::Graph => "graph",
                        SearchPath::ExactFiltered => "exact_filtered",
                        SearchPath::ExactFallback => "exact_fallback",
                    };
                    metrics::counter!(m::SEARCH_PATH, "path" => path).increment(1);
                    statuses.push(v1::ShardStatus {
                        region: region.to_string(),
                        shard: number,
                        answered: true,
                        error: String::new(),
                    });
                    merged.extend(hits.into_iter().map(|h| (region.clone(), h, engine.clone())));
                }
                Err(e) => statuses.push(v1::ShardStatus {
                    region: region.to_string(),
                    shard: number,
                    answered: false,
                    error: format!("shard search failed: {e}"),
                }),
            }
        }
        let partial = statuses.iter().any(|s| !s.answered);
        if partial && !req.allow_partial {
            let missing: Vec<String> = statuses
                .iter()
                .filter(|s| !s.answered)
                .map(|s| format!("{}/{}", s.region, s.shard))
                .collect();
            return Err(ApiError::unavailable(format!(
                "shards {} did not answer; retry, or set allow_partial to accept results without them",
                missing.join(", ")
            )));
        }
        merged.sort_by(|a, b| a.1.distance.total_cmp(&b.1.distance).then(a.0.cmp(&b.0)).then(a.1.id.cmp(&b.1.id)));
        merged.truncate(k);

        let (with_payload, with_vector) = (req.with_payload, req.with_vector);
        let state = self.state.clone();
        let mut budget = AnswerBudget::new();
        for s in &statuses {
            budget.add(s);
        }
        let hits = blocking(move || -> Result<Vec<v1::ScoredPoint>, ApiError> {
            let mut out = Vec::with_capacity(merged.len());
            for (region, hit, engine) in merged {
                let point = if with_payload || with_vector {
                    // Re-read under the same clock: a point deleted or expired since
                    // the index answered is dropped, never returned.
                    match engine.get(&hit.id, now).map_err(|e| state.storage_failed(e))? {
                        Some(r) => point_to(&r, with_vector, with_payload),
                        None => continue,
                    }
                } else {
                    v1::Point {
                        id: Some(point_id_to(&hit.id)),
                        region: region.to_string(),
                        ..Default::default()
                    }
                };
                let scored = v1::ScoredPoint {
                    point: Some(point),
                    distance: hit.distance,
                };
                if !budget.add(&scored) {
                    return Err(ApiError::new(
                        ErrorCode::ResourceExhausted,
                        format!(
                            "the answer would pass {MAX_ANSWER_BYTES} bytes: only {} of the {k} hits asked for fitted; lower k to at most {}, or set with_payload / with_vector to false",
                            out.len(),
                            out.len().max(1)
                        ),
                    ));
                }
                out.push(scored);
            }
            Ok(out)
        })
        .await??;
        Ok(v1::SearchResponse {
            hits,
            shards: statuses,
            partial,
        })
    }
}
