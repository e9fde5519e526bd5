use super::{blocking, now_ms, observe};
use crate::state::{Collection, NodeState};
use sovra_proto::convert::{point_from, point_id_from, point_to};
use sovra_proto::v1::{self, points_server::Points};
use sovra_shard::ShardEngine;
use sovra_types::limits::MAX_IDS_PER_REQUEST;
use sovra_types::validate::{check_region, prepare_batch};
use sovra_types::{ApiError, PointId, RegionId, ShardCommand};
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

/// Applies one command per shard touched. Everything was validated before this
/// point; the only failure left is storage, which stops the node.
async fn write(state: &Arc<NodeState>, per_shard: Vec<(Arc<ShardEngine>, ShardCommand)>) -> Result<v1::WriteResponse, ApiError> {
    let mut out = v1::WriteResponse::default();
    for (engine, cmd) in per_shard {
        let e = engine.clone();
        let outcome = blocking(move || e.apply_next(&cmd)).await?.map_err(|e| state.storage_failed(e))?;
        out.count += outcome.changed as u64;
        out.writes.push(v1::ShardWrite {
            region: engine.id().region.to_string(),
            shard: engine.id().number,
            index: outcome.index,
        });
    }
    Ok(out)
}

/// Items grouped by the shard that owns them, in shard order.
type PerShard<T> = Vec<(Arc<ShardEngine>, Vec<T>)>;

fn group<T>(c: &Collection, items: Vec<(RegionId, PointId, T)>) -> Result<PerShard<T>, ApiError> {
    let mut by_shard: BTreeMap<(RegionId, u32), (Arc<ShardEngine>, Vec<T>)> = BTreeMap::new();
    for (region, id, item) in items {
        let engine = c.route(&region, &id)?;
        by_shard
            .entry((region, engine.id().number))
            .or_insert_with(|| (engine.clone(), Vec::new()))
            .1
            .push(item);
    }
    Ok(by_shard.into_values().collect())
}

#[tonic::async_trait]
impl Points for PointsService {
    async fn upsert(&self, req: Request<v1::UpsertRequest>) -> Result<Response<v1::WriteResponse>, Status> {
        observe("upsert", async {
            let req = req.into_inner();
            let c = self.state.collection(&req.collection)?;
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
            write(&self.state, per_shard).await
        })
        .await
    }

    async fn get(&self, req: Request<v1::GetPointsRequest>) -> Result<Response<v1::GetPointsResponse>, Status> {
        observe("get", async {
            let req = req.into_inner();
            let c = self.state.collection(&req.collection)?;
            let region = check_region(&c.spec, &req.region).map_err(|e| e.at("region"))?;
            let ids = ids_from(&req.ids)?;
            let routed = ids
                .iter()
                .map(|id| c.route(&region, id).map(|e| (e.clone(), *id)))
                .collect::<Result<Vec<_>, _>>()?;
            let now = now_ms();
            let state = self.state.clone();
            let (with_vector, with_payload) = (req.with_vector, req.with_payload);
            blocking(move || {
                let mut points = Vec::new();
                for (engine, id) in routed {
                    if let Some(r) = engine.get(&id, now).map_err(|e| state.storage_failed(e))? {
                        points.push(point_to(&r, with_vector, with_payload));
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
            let c = self.state.collection(&req.collection)?;
            let region = check_region(&c.spec, &req.region).map_err(|e| e.at("region"))?;
            let ids = ids_from(&req.ids)?;
            let keyed = ids.into_iter().map(|id| (region.clone(), id, id)).collect();
            let per_shard = group(&c, keyed)?
                .into_iter()
                .map(|(e, ids)| (e, ShardCommand::Delete(ids)))
                .collect();
            write(&self.state, per_shard).await
        })
        .await
    }
}
