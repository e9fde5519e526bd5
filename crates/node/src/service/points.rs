use super::{AnswerBudget, ReadLevels, blocking, now_ms, observe};
use crate::state::{Collection, NodeState};
use sovra_proto::convert::{point_from, point_id_from, point_to};
use sovra_proto::v1::{self, points_server::Points};
use sovra_types::limits::{MAX_ANSWER_BYTES, MAX_IDS_PER_REQUEST};
use sovra_types::validate::{check_command, check_region, prepare_batch};
use sovra_types::{ApiError, ErrorCode, PointId, RegionId, ShardCommand, ShardId};
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct PointsService {
    pub state: Arc<NodeState>,
}

fn ids_from(ids: &[v1::PointId]) -> Result<Vec<PointId>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid("ids is empty: name at least one point"));
    }
    if ids.len() > MAX_IDS_PER_REQUEST {
        return Err(ApiError::invalid(format!(
            "ids has {} entries: at most {MAX_IDS_PER_REQUEST} per request",
            ids.len()
        )));
    }
    ids.iter()
        .enumerate()
        .map(|(i, p)| point_id_from(Some(p), &format!("ids[{i}]")))
        .collect()
}

/// Commits one command per shard touched, each through its Raft group. Every
/// point was validated, and every shard checked, before the first is written,
/// so any refusal writes nothing. Shards are independent groups: if one fails
/// to commit after others did, the error says which committed (retrying the
/// whole request is safe: writes are idempotent by id).
async fn write(state: &Arc<NodeState>, c: &Collection, per_shard: Vec<(ShardId, ShardCommand)>) -> Result<v1::WriteResponse, ApiError> {
    for (shard, cmd) in &per_shard {
        // R2: a region's data enters the cluster only through that region's nodes.
        if shard.region != state.region {
            return Err(ApiError::precondition(format!(
                "points of region {} must be written through a node of {} (nodes {:?}); this node is in {}; nothing was written",
                shard.region,
                shard.region,
                state.region_nodes(&shard.region),
                state.region
            )));
        }
        // The same check every proposal path runs, here for all shards first.
        check_command(&c.spec, shard, cmd)?;
    }
    let mut out = v1::WriteResponse::default();
    for (shard, cmd) in per_shard {
        let members = state.replicas(&c.spec, &shard);
        match state.host.write_to(&shard, &members, cmd).await {
            Ok(ack) => {
                out.count += ack.changed;
                out.writes.push(v1::ShardWrite {
                    region: shard.region.to_string(),
                    shard: shard.number,
                    index: ack.index,
                });
            }
            Err(mut e) => {
                if !out.writes.is_empty() {
                    let done: Vec<String> = out
                        .writes
                        .iter()
                        .map(|w| format!("{}/{} at index {}", w.region, w.shard, w.index))
                        .collect();
                    e.message = format!(
                        "{}; shards {} did commit their part (retrying the whole request is safe)",
                        e.message,
                        done.join(", ")
                    );
                }
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// Items grouped by the shard that owns them, in shard order.
type PerShard<T> = Vec<(ShardId, Vec<T>)>;

fn group<T>(c: &Collection, items: Vec<(RegionId, PointId, T)>) -> Result<PerShard<T>, ApiError> {
    let mut by_shard: BTreeMap<ShardId, Vec<T>> = BTreeMap::new();
    for (region, id, item) in items {
        by_shard.entry(c.route(&region, &id)?).or_default().push(item);
    }
    Ok(by_shard.into_iter().collect())
}

#[tonic::async_trait]
impl Points for PointsService {
    async fn upsert(&self, req: Request<v1::UpsertRequest>) -> Result<Response<v1::WriteResponse>, Status> {
        observe("upsert", async {
            let req = req.into_inner();
            let c = self.state.collection_now(&req.collection).await?;
            let records = req
                .points
                .into_iter()
                .enumerate()
                .map(|(i, p)| point_from(p, i))
                .collect::<Result<Vec<_>, _>>()?;
            let records = prepare_batch(&c.spec, records, now_ms())?;
            let keyed = records.into_iter().map(|r| (r.region.clone(), r.id, r)).collect();
            let per_shard = group(&c, keyed)?
                .into_iter()
                .map(|(e, recs)| (e, ShardCommand::Upsert(recs)))
                .collect();
            write(&self.state, &c, per_shard).await
        })
        .await
    }

    async fn get(&self, req: Request<v1::GetPointsRequest>) -> Result<Response<v1::GetPointsResponse>, Status> {
        observe("get", async {
            let req = req.into_inner();
            let c = self.state.collection_now(&req.collection).await?;
            let region = check_region(&c.spec, &req.region).map_err(|e| e.at("region"))?;
            let ids = ids_from(&req.ids)?;
            let levels = ReadLevels::parse(req.consistency, &req.after)?;
            let mut routed = Vec::with_capacity(ids.len());
            let mut ready = std::collections::BTreeSet::new();
            for id in &ids {
                let shard = c.route(&region, id)?;
                let engine = c.local_or_unavailable(&self.state, &shard)?.clone();
                if ready.insert(shard.clone()) {
                    self.state.host.read_barrier(&shard, levels.for_shard(&shard)).await?;
                }
                routed.push((engine, *id));
            }
            let now = now_ms();
            let state = self.state.clone();
            let (with_vector, with_payload) = (req.with_vector, req.with_payload);
            blocking(move || {
                let asked = routed.len();
                let mut points = Vec::new();
                let mut budget = AnswerBudget::new();
                for (engine, id) in routed {
                    if let Some(r) = engine.get(&id, now).map_err(|e| state.storage_failed(e))? {
                        let p = point_to(&r, with_vector, with_payload);
                        if !budget.add(&p) {
                            return Err(ApiError::new(
                                ErrorCode::ResourceExhausted,
                                format!(
                                    "the answer would pass {MAX_ANSWER_BYTES} bytes: only {} of the {asked} points asked for fitted; ask for at most {} ids per request, or leave out with_payload / with_vector",
                                    points.len(),
                                    points.len().max(1)
                                ),
                            ));
                        }
                        points.push(p);
                    }
                }
                Ok(v1::GetPointsResponse { points })
            })
            .await?
        })
        .await
    }

    async fn delete(&self, req: Request<v1::DeletePointsRequest>) -> Result<Response<v1::WriteResponse>, Status> {
        observe("delete", async {
            let req = req.into_inner();
            let c = self.state.collection_now(&req.collection).await?;
            let region = check_region(&c.spec, &req.region).map_err(|e| e.at("region"))?;
            let ids = ids_from(&req.ids)?;
            let keyed = ids.into_iter().map(|id| (region.clone(), id, id)).collect();
            let per_shard = group(&c, keyed)?
                .into_iter()
                .map(|(e, ids)| (e, ShardCommand::Delete(ids)))
                .collect();
            write(&self.state, &c, per_shard).await
        })
        .await
    }
}
